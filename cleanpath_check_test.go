package main

import (
	"path"
	"testing"
)

func TestCleanURLPathAgreesWithPathClean(t *testing.T) {
	for _, p := range []string{"/proxy/a", "/proxy/a/", "/proxy//a", "/proxy/./a", "/proxy/../a", "/proxy/a/..", "/proxy/a/.", "/proxy/a/.b", "/proxy/..a/", "/proxy/a//", "/proxy/"} {
		c := path.Clean(p)
		want := c == p || c+"/" == p
		if got := cleanURLPath(p); got != want {
			t.Errorf("cleanURLPath(%q) = %v; want %v", p, got, want)
		}
	}
}
