package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
)

// A JSON scanner that finds where values end without decoding them, for the
// hot path of calls: a request's JSON is checked and a reply's members are
// found without allocating. It accepts exactly what encoding/json accepts
// (FuzzJSONScan compares the two); anything unusual is left to
// encoding/json.

// maxJSONDepth is encoding/json's nesting limit.
const maxJSONDepth = 10000

// validJSON is json.Valid.
func validJSON(b []byte) bool {
	end := scanJSONValue(b, 0, 0)
	return end >= 0 && skipJSONSpace(b, end) == len(b)
}

// jsonNestsDeeper reports whether b, read as JSON text, opens more than
// limit arrays and objects inside one another anywhere. It checks nothing
// else, and goes on where scanJSONValue and json.Valid stop at
// maxJSONDepth, so that text nested too deep is told so, valid or not.
func jsonNestsDeeper(b []byte, limit int) bool {
	depth, inString := 0, false
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case inString && c == '\\':
			i++ // the escaped byte, a quote perhaps
		case c == '"':
			inString = !inString
		case inString:
		case c == '[' || c == '{':
			if depth++; depth > limit {
				return true
			}
		case c == ']' || c == '}':
			depth--
		}
	}
	return false
}

func skipJSONSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// scanJSONValue returns the end of the value that starts at b[i], after
// any space, or -1 when there is no valid value there.
func scanJSONValue(b []byte, i, depth int) int {
	i = skipJSONSpace(b, i)
	if i >= len(b) {
		return -1
	}
	switch c := b[i]; {
	case c == '{' || c == '[':
		return scanJSONComposite(b, i, depth)
	case c == '"':
		return scanJSONString(b, i)
	case c == '-' || '0' <= c && c <= '9':
		return scanJSONNumber(b, i)
	}
	for _, lit := range [...]string{"true", "false", "null"} {
		if bytes.HasPrefix(b[i:], []byte(lit)) {
			return i + len(lit)
		}
	}
	return -1
}

// scanJSONComposite scans an object or an array starting at b[i].
func scanJSONComposite(b []byte, i, depth int) int {
	if depth >= maxJSONDepth {
		return -1
	}
	open := b[i]
	closing := byte(']')
	if open == '{' {
		closing = '}'
	}
	i = skipJSONSpace(b, i+1)
	if i < len(b) && b[i] == closing {
		return i + 1
	}
	for {
		if open == '{' {
			i = skipJSONSpace(b, i)
			if i >= len(b) || b[i] != '"' {
				return -1
			}
			if i = scanJSONString(b, i); i < 0 {
				return -1
			}
			if i = skipJSONSpace(b, i); i >= len(b) || b[i] != ':' {
				return -1
			}
			i++
		}
		if i = scanJSONValue(b, i, depth+1); i < 0 {
			return -1
		}
		if i = skipJSONSpace(b, i); i >= len(b) {
			return -1
		}
		switch b[i] {
		case closing:
			return i + 1
		case ',':
			i++
		default:
			return -1
		}
	}
}

// scanJSONString scans a string starting at its quote, b[i].
func scanJSONString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return i + 1
		case c < 0x20:
			return -1
		case c == '\\':
			i++
			if i >= len(b) {
				return -1
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) {
					return -1
				}
				for _, h := range b[i+1 : i+5] {
					if !isHex(h) {
						return -1
					}
				}
				i += 4
			default:
				return -1
			}
		}
	}
	return -1
}

// scanJSONNumber scans -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?.
func scanJSONNumber(b []byte, i int) int {
	digits := func(i int) int {
		j := i
		for j < len(b) && '0' <= b[j] && b[j] <= '9' {
			j++
		}
		if j == i {
			return -1
		}
		return j
	}
	if b[i] == '-' {
		i++
	}
	if i < len(b) && b[i] == '0' {
		i++
	} else if i = digits(i); i < 0 {
		return -1
	}
	if i < len(b) && b[i] == '.' {
		if i = digits(i + 1); i < 0 {
			return -1
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i = digits(i); i < 0 {
			return -1
		}
	}
	return i
}

// objectMember reads the member of an object that starts at i (after
// white space, a '{' or a ','): its key as written, without quotes, and
// its value, and returns the index after the value; -1 when there is no
// valid member there.
func objectMember(body []byte, i int) (key, value []byte, next int) {
	if i = skipJSONSpace(body, i); i >= len(body) || body[i] != '"' {
		return nil, nil, -1
	}
	start := i
	if i = scanJSONString(body, i); i < 0 {
		return nil, nil, -1
	}
	key = body[start+1 : i-1]
	if i = skipJSONSpace(body, i); i >= len(body) || body[i] != ':' {
		return nil, nil, -1
	}
	vstart := skipJSONSpace(body, i+1)
	if i = scanJSONValue(body, vstart, 1); i < 0 {
		return nil, nil, -1
	}
	return key, body[vstart:i], i
}

// unknownMember returns a member key of the object body that matches none
// of known in any case (as encoding/json matches keys to fields), if there
// is one. body is a valid JSON object.
func unknownMember(body []byte, known ...string) (unknown string, found bool) {
	eachMemberKey(body, func(key []byte) bool {
		if !slices.ContainsFunc(known, func(name string) bool { return bytes.EqualFold(key, []byte(name)) }) {
			unknown, found = string(key), true
		}
		return !found
	})
	return unknown, found
}

// membersGiven reports, for each of names, whether the object body has a
// member of that key in any case. body is a valid JSON object.
func membersGiven(body []byte, names []string) []bool {
	given := make([]bool, len(names))
	eachMemberKey(body, func(key []byte) bool {
		for i, name := range names {
			given[i] = given[i] || bytes.EqualFold(key, []byte(name))
		}
		return true
	})
	return given
}

// eachMemberKey calls f with each member key of the object body, in
// order, while f returns true. body is a valid JSON object; a key with an
// escape in it is read with encoding/json.
func eachMemberKey(body []byte, f func(key []byte) bool) {
	i := skipJSONSpace(body, 0) + 1 // past the '{'
	if j := skipJSONSpace(body, i); j < len(body) && body[j] == '}' {
		return
	}
	for {
		key, _, next := objectMember(body, i)
		if next < 0 {
			return
		}
		if bytes.IndexByte(key, '\\') >= 0 {
			var k string
			json.Unmarshal(append(append([]byte{'"'}, key...), '"'), &k)
			key = []byte(k)
		}
		if !f(key) {
			return
		}
		if i = skipJSONSpace(body, next); i >= len(body) || body[i] != ',' {
			return
		}
		i++
	}
}

// replyMembers finds the id, result and error members of a reply object,
// the last of each counting, as encoding/json does. ok is false when the
// body is not a valid object, or has a key encoding/json might match
// differently (an escape, or one of ours in another case): the caller then
// decodes with encoding/json.
func replyMembers(body []byte) (id, result, errVal []byte, ok bool) {
	i := skipJSONSpace(body, 0)
	if i >= len(body) || body[i] != '{' {
		return nil, nil, nil, false
	}
	i = skipJSONSpace(body, i+1)
	if i < len(body) && body[i] == '}' {
		return nil, nil, nil, skipJSONSpace(body, i+1) == len(body)
	}
	for {
		var key, value []byte
		if key, value, i = objectMember(body, i); i < 0 {
			return nil, nil, nil, false
		}
		switch string(key) {
		case "id":
			id = value
		case "result":
			result = value
		case "error":
			errVal = value
		default:
			if bytes.IndexByte(key, '\\') >= 0 || bytes.EqualFold(key, []byte("id")) || bytes.EqualFold(key, []byte("result")) || bytes.EqualFold(key, []byte("error")) {
				return nil, nil, nil, false
			}
		}
		if i = skipJSONSpace(body, i); i >= len(body) {
			return nil, nil, nil, false
		}
		switch body[i] {
		case '}':
			if skipJSONSpace(body, i+1) != len(body) {
				return nil, nil, nil, false
			}
			return id, result, errVal, true
		case ',':
			i++
		default:
			return nil, nil, nil, false
		}
	}
}

func isHex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F' }

// jsonErrorText is err, from encoding/json, as a caller reads it: a type
// error names where it is, what came and what should have, rather than a
// Go type with its tags.
func jsonErrorText(err error) string {
	var te *json.UnmarshalTypeError
	if !errors.As(err, &te) {
		return err.Error()
	}
	came := "a JSON " + te.Value
	switch {
	case te.Value == "bool":
		came = "a JSON boolean"
	case strings.HasPrefix(te.Value, "number "): // one that does not fit: its literal follows
		came = "the JSON " + te.Value
	}
	if te.Field == "" {
		return "the body is " + came + ", not an object"
	}
	want := jsonKind(te.Type)
	article := "a"
	if strings.IndexByte("aeiou", want[0]) >= 0 {
		article = "an"
	}
	return fmt.Sprintf("%s: %s where %s %s should be", strings.ToLower(te.Field), came, article, want)
}

// jsonKind names, in JSON's words, what a value of Go type t is.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Slice, reflect.Array:
		return "array"
	case reflect.Map, reflect.Struct:
		return "object"
	case reflect.Pointer:
		return jsonKind(t.Elem())
	case reflect.Float32, reflect.Float64:
		return "number"
	}
	return "integer"
}
