package main

// The multicast registry's records and packets as pure functions of values,
// in the manner of hashicorp/mdns zone.go: what we announce is a function of
// a node, what we answer is a function of a question, and what a packet
// teaches us is a function of its bytes and the cache. mdns.go only moves
// packets and keeps time.

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

const (
	// mdnsServiceType is the DNS-SD service type every node is an instance
	// of (RFC 6763 section 7).
	mdnsServiceType = "_micro._tcp.local."
	// mdnsServicesEnum lists the service types on the link (RFC 6763
	// section 9), so that `avahi-browse -a` finds ours.
	mdnsServicesEnum = "_services._dns-sd._udp.local."
	// mdnsMaxPacket is the largest mDNS packet, in bytes (RFC 6762 section
	// 17); larger ones are dropped.
	mdnsMaxPacket = 9000
	// mdnsPacketTarget is what a response of several nodes is cut to, so
	// that it fits one Ethernet frame; a single node larger than that goes
	// alone, up to mdnsMaxPacket.
	mdnsPacketTarget = 1400
	// mdnsMaxRecords bounds the records read from one packet; a packet with
	// more is dropped as hostile.
	mdnsMaxRecords = 256
	// mdnsMaxTTL caps the TTL of what we hear, so that a hostile or broken
	// peer cannot pin an entry in the cache for years.
	mdnsMaxTTL = 24 * 60 * 60
	// mdnsLegacyTTL is the TTL of answers to legacy unicast queries (RFC
	// 6762 section 6.7: no more than ten seconds).
	mdnsLegacyTTL = 10
	// mdnsMaxTXT bounds one node's TXT record in bytes; RFC 6763 section
	// 6.2 allows up to a packet, and we keep room for the other records.
	mdnsMaxTXT = 8000
	// mdnsMaxAddrs bounds the addresses kept for one host name.
	mdnsMaxAddrs = 8
	// classFlush is the cache-flush bit of a resource's class (RFC 6762
	// section 10.2), and, in a question, the unicast-response bit (section
	// 5.4).
	classFlush = 0x8000
)

// Keys of our TXT record (RFC 6763 section 6). Node metadata travels as
// key=value too; a metadata key that is one of these, or starts with one of
// the prefixes, travels as "node:" + key so that nothing is ambiguous.
// Service metadata travels as "svc:" + key.
const (
	txtVers       = "txtvers"
	txtName       = "name"
	txtID         = "id"
	txtVersion    = "version"
	txtSvcPrefix  = "svc:"
	txtNodePrefix = "node:"
)

// errNotAnnounceable is returned for a registration the multicast registry
// cannot carry (a TXT string is at most 255 bytes); the registry answers it
// with 400 and the message says what to change.
var errNotAnnounceable = errors.New("cannot be announced over mDNS")

// instanceLabel is the DNS-SD instance label of a node: its id, with dots
// (which cannot appear inside a label that x/net/dns/dnsmessage reads) made
// dashes and cut to 54 bytes, a dash, and 8 hex digits of a hash of the
// service and the full id. The hash keeps apart what the readable part
// would not: ids that differ in a dot or in case (mDNS names ignore case),
// one id under two services, on one sidecar or on two; the full id and
// the service travel in TXT.
func instanceLabel(service, id string) string {
	l := strings.ReplaceAll(id, ".", "-")
	if len(l) > 54 {
		l = l[:54]
	}
	return l + "-" + shortHash(service+"\x00"+id)
}

// uniqueLabel is the label used in the unlikely case that instanceLabel is
// already taken on this sidecar by another node (its hash collided): a
// hash of a different input.
func uniqueLabel(service, id string) string {
	return instanceLabel("\x01"+service, id)
}

func shortHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:4])
}

// txtOf is the TXT record of one node: txtvers first (RFC 6763 section
// 6.7), then name, id, version, service metadata, node metadata, each group
// in key order.
func txtOf(r record) ([]string, error) {
	out := []string{txtVers + "=1", txtName + "=" + r.Service, txtID + "=" + r.Node.ID}
	if r.Version != "" {
		out = append(out, txtVersion+"="+r.Version)
	}
	named := make([]string, len(out), len(out)+len(r.Metadata)+len(r.Node.Metadata)) // each string's key as the client gave it
	for _, k := range sortedKeys(r.Metadata) {
		out = append(out, txtSvcPrefix+k+"="+r.Metadata[k])
		named = append(named, fmt.Sprintf("service metadata key %q", truncate(k, 32)))
	}
	for _, k := range sortedKeys(r.Node.Metadata) {
		key := k
		if txtReserved(k) {
			key = txtNodePrefix + k
		}
		out = append(out, key+"="+r.Node.Metadata[k])
		named = append(named, fmt.Sprintf("metadata key %q", truncate(k, 32)))
	}
	for _, md := range []map[string]string{r.Metadata, r.Node.Metadata} {
		for k := range md {
			if !printableKey(k) {
				return nil, fmt.Errorf("node %q: metadata key %q: DNS-SD keys are printable ASCII without '=': %w", truncate(r.Node.ID, 64), truncate(k, 32), errNotAnnounceable)
			}
		}
	}
	// RFC 6763 section 6.4: keys ignore case, and a reader keeps the first
	// of two that differ in case alone; other DNS-SD tools would then show
	// another node than the sidecars do. Only metadata keys can meet so:
	// the first strings' keys are fixed, and keys that could be taken for
	// them travel escaped.
	keys := make(map[string]int, len(out))
	for i, s := range out {
		key, _, _ := strings.Cut(s, "=")
		if j, ok := keys[strings.ToLower(key)]; ok {
			return nil, fmt.Errorf("node %q: %s and %s differ only in case, and DNS-SD keys ignore case: %w", truncate(r.Node.ID, 64), named[j], named[i], errNotAnnounceable)
		}
		keys[strings.ToLower(key)] = i
	}
	total := 0
	for _, s := range out {
		if len(s) > 255 {
			key, _, _ := strings.Cut(s, "=")
			return nil, fmt.Errorf("node %q: %s=... is %d bytes and a TXT string holds 255: %w; shorten it or use --registry=file", truncate(r.Node.ID, 64), truncate(key, 32), len(s), errNotAnnounceable)
		}
		total += 1 + len(s)
	}
	if total > mdnsMaxTXT {
		return nil, fmt.Errorf("node %q: TXT record of %d bytes (txtvers, name, id, version and metadata, each key=value after a length byte) exceeds the %d it may carry: %w; use --registry=file", truncate(r.Node.ID, 64), total, mdnsMaxTXT, errNotAnnounceable)
	}
	return out, nil
}

// txtReserved reports whether a node metadata key must be escaped with
// "node:". DNS-SD keys compare case-insensitively (RFC 6763 section 6.4).
func txtReserved(k string) bool {
	l := strings.ToLower(k)
	switch l {
	case txtVers, txtName, txtID, txtVersion:
		return true
	}
	return strings.HasPrefix(l, txtSvcPrefix) || strings.HasPrefix(l, txtNodePrefix)
}

// printableKey: RFC 6763 section 6.4, printable US-ASCII except '='.
func printableKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e || k[i] == '=' {
			return false
		}
	}
	return true
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// txtRecord is what a TXT record of ours says.
type txtRecord struct {
	name, id, version string
	svcMeta, nodeMeta map[string]string
}

// parseTXT reads a TXT record in our layout. ok is false when it is not
// ours (no name or id) or is a version we do not know; the first occurrence
// of a key wins (RFC 6763 section 6.4).
func parseTXT(txt []string) (txtRecord, bool) {
	r := txtRecord{svcMeta: map[string]string{}, nodeMeta: map[string]string{}}
	var haveName, haveID bool
	seen := map[string]bool{}
	for _, s := range txt {
		if s == "" {
			continue
		}
		k, v, _ := strings.Cut(s, "=")
		if k == "" {
			continue // RFC 6763 section 6.4: a string starting with '=' is ignored
		}
		l := strings.ToLower(k)
		switch {
		case l == txtVers || l == txtName || l == txtID || l == txtVersion:
			if seen[l] {
				continue
			}
			seen[l] = true
			switch l {
			case txtVers:
				if v != "1" {
					return txtRecord{}, false
				}
			case txtName:
				r.name, haveName = v, true
			case txtID:
				r.id, haveID = v, true
			case txtVersion:
				r.version = v
			}
		case strings.HasPrefix(l, txtSvcPrefix):
			if key := k[len(txtSvcPrefix):]; key != "" && !seen["svc "+strings.ToLower(key)] {
				seen["svc "+strings.ToLower(key)] = true
				r.svcMeta[key] = v
			}
		default:
			key := k
			if strings.HasPrefix(l, txtNodePrefix) {
				key = k[len(txtNodePrefix):]
			}
			if key == "" || seen["node "+strings.ToLower(key)] {
				continue // Zone=a then zone=b: one key, read as first given
			}
			seen["node "+strings.ToLower(key)] = true
			r.nodeMeta[key] = v
		}
	}
	return r, haveName && haveID
}

// mdnsAnnouncement is everything we publish for one node: an instance of
// _micro._tcp with SRV, TXT and, when the node's address is an IP, an A or
// AAAA record for a host name of its own. A node whose address is a host
// name has that name as its SRV target and no address record.
type mdnsAnnouncement struct {
	key      string // the record's key in the table
	instance string // label + "." + mdnsServiceType
	host     string // SRV target, a fully qualified name
	port     uint16
	txt      []string
	addr     netip.Addr // invalid when host is the node's own DNS name
}

// announcementOf builds the announcement of one node under label, or says
// why the node cannot be announced.
func announcementOf(r record, label string) (mdnsAnnouncement, error) {
	txt, err := txtOf(r)
	if err != nil {
		return mdnsAnnouncement{}, err
	}
	a := mdnsAnnouncement{key: r.key(), instance: label + "." + mdnsServiceType, port: uint16(r.Node.Port), txt: txt}
	if addr, err := netip.ParseAddr(r.Node.Address); err == nil {
		if addr.Zone() != "" {
			return mdnsAnnouncement{}, fmt.Errorf("node %q: address %s has a zone, which an AAAA record cannot carry: %w", truncate(r.Node.ID, 64), r.Node.Address, errNotAnnounceable)
		}
		a.addr = addr.Unmap()
		a.host = label + ".local."
	} else {
		a.host = strings.TrimSuffix(r.Node.Address, ".") + "."
		if !validHostName(a.host) {
			return mdnsAnnouncement{}, fmt.Errorf("node %q: address %q is neither an IP address nor a DNS name: %w", truncate(r.Node.ID, 64), truncate(r.Node.Address, 64), errNotAnnounceable)
		}
	}
	for _, n := range []string{a.instance, a.host} {
		if _, err := dnsmessage.NewName(n); err != nil || len(n) > 254 {
			return mdnsAnnouncement{}, fmt.Errorf("node %q: name %q is too long for DNS: %w", truncate(r.Node.ID, 64), truncate(n, 64), errNotAnnounceable)
		}
	}
	return a, nil
}

// validHostName: a fully qualified name of labels of 1 to 63 bytes.
func validHostName(fqdn string) bool {
	if len(fqdn) < 2 || len(fqdn) > 254 {
		return false
	}
	for _, l := range strings.Split(strings.TrimSuffix(fqdn, "."), ".") {
		if l == "" || len(l) > 63 {
			return false
		}
	}
	return true
}

// resources are the announcement's records with ttl seconds to live: the
// shared PTR, then the unique SRV, TXT and address, which carry the
// cache-flush bit (RFC 6762 section 10.2) unless legacy is set (section 6.7:
// never in answers to legacy unicast queries).
func (a mdnsAnnouncement) resources(ttl uint32, legacy bool) (ptr dnsmessage.Resource, unique []dnsmessage.Resource) {
	flush := dnsmessage.Class(classFlush)
	if legacy {
		flush = 0
	}
	hdr := func(name string, class dnsmessage.Class) dnsmessage.ResourceHeader {
		return dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(name), Class: dnsmessage.ClassINET | class, TTL: ttl}
	}
	instance := dnsmessage.MustNewName(a.instance)
	ptr = dnsmessage.Resource{Header: hdr(mdnsServiceType, 0), Body: &dnsmessage.PTRResource{PTR: instance}}
	unique = []dnsmessage.Resource{
		{Header: hdr(a.instance, flush), Body: &dnsmessage.SRVResource{Target: dnsmessage.MustNewName(a.host), Port: a.port}},
		{Header: hdr(a.instance, flush), Body: &dnsmessage.TXTResource{TXT: a.txt}},
	}
	switch {
	case a.addr.Is4():
		unique = append(unique, dnsmessage.Resource{Header: hdr(a.host, flush), Body: &dnsmessage.AResource{A: a.addr.As4()}})
	case a.addr.Is6():
		unique = append(unique, dnsmessage.Resource{Header: hdr(a.host, flush), Body: &dnsmessage.AAAAResource{AAAA: a.addr.As16()}})
	}
	return ptr, unique
}

// announcePacket is the unsolicited response that announces a (ttl > 0) or
// says goodbye to (ttl 0, RFC 6762 section 10.1) one node: every record in
// the answer section (section 8.3).
func announcePacket(a mdnsAnnouncement, ttl uint32) ([]byte, error) {
	ptr, unique := a.resources(ttl, false)
	return buildMessage(dnsmessage.Header{Response: true, Authoritative: true}, nil, append([]dnsmessage.Resource{ptr}, unique...), nil)
}

// queryPacket asks the questions in one query (RFC 6762 section 5), with
// known answers for the known-answer suppression of section 7.1.
func queryPacket(qs []dnsmessage.Question, known []dnsmessage.Resource) ([]byte, error) {
	return buildMessage(dnsmessage.Header{}, qs, known, nil)
}

func question(name string, t dnsmessage.Type) dnsmessage.Question {
	return dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: t, Class: dnsmessage.ClassINET}
}

// buildMessage packs one DNS message with name compression.
func buildMessage(h dnsmessage.Header, qs []dnsmessage.Question, answers, extra []dnsmessage.Resource) ([]byte, error) {
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), h)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	for _, q := range qs {
		if err := b.Question(q); err != nil {
			return nil, err
		}
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	for _, r := range answers {
		if err := addResource(&b, r); err != nil {
			return nil, err
		}
	}
	if err := b.StartAdditionals(); err != nil {
		return nil, err
	}
	for _, r := range extra {
		if err := addResource(&b, r); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

func addResource(b *dnsmessage.Builder, r dnsmessage.Resource) error {
	switch body := r.Body.(type) {
	case *dnsmessage.PTRResource:
		return b.PTRResource(r.Header, *body)
	case *dnsmessage.SRVResource:
		return b.SRVResource(r.Header, *body)
	case *dnsmessage.TXTResource:
		return b.TXTResource(r.Header, *body)
	case *dnsmessage.AResource:
		return b.AResource(r.Header, *body)
	case *dnsmessage.AAAAResource:
		return b.AAAAResource(r.Header, *body)
	}
	return fmt.Errorf("unexpected resource %T", r.Body)
}

// mdnsRR is one resource record as heard, with its name lower-cased (DNS
// names compare case-insensitively).
type mdnsRR struct {
	name  string
	typ   dnsmessage.Type
	ttl   uint32
	flush bool

	target string // PTR or SRV target, lower-cased
	port   uint16
	txt    []string
	addr   netip.Addr
}

// mdnsPacket is what one packet says, reduced to the records we use.
type mdnsPacket struct {
	id        uint16
	response  bool
	questions []dnsmessage.Question
	records   []mdnsRR // for a query, its known answers
}

// errMalformed marks packets that are dropped and counted.
var errMalformed = errors.New("malformed mDNS packet")

// parsePacket reads a packet. Records of other types are skipped; any
// error in the packet drops all of it, so that half a packet never reaches
// the cache.
func parsePacket(data []byte) (mdnsPacket, error) {
	if len(data) > mdnsMaxPacket {
		return mdnsPacket{}, fmt.Errorf("%w: %d bytes, more than %d", errMalformed, len(data), mdnsMaxPacket)
	}
	var p dnsmessage.Parser
	h, err := p.Start(data)
	if err != nil {
		return mdnsPacket{}, fmt.Errorf("%w: %v", errMalformed, err)
	}
	// RFC 6762 section 18: opcode must be 0 and rcode 0, else silently ignored.
	if h.OpCode != 0 || h.RCode != 0 {
		return mdnsPacket{}, fmt.Errorf("%w: opcode %d rcode %d", errMalformed, h.OpCode, h.RCode)
	}
	pkt := mdnsPacket{id: h.ID, response: h.Response}
	count := 0
	for {
		q, err := p.Question()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return mdnsPacket{}, fmt.Errorf("%w: question: %v", errMalformed, err)
		}
		if count++; count > mdnsMaxRecords {
			return mdnsPacket{}, fmt.Errorf("%w: more than %d records", errMalformed, mdnsMaxRecords)
		}
		q.Name = lowerName(q.Name)
		pkt.questions = append(pkt.questions, q)
	}
	sections := []struct {
		header func() (dnsmessage.ResourceHeader, error)
		skip   func() error
	}{{p.AnswerHeader, p.SkipAnswer}, {p.AuthorityHeader, p.SkipAuthority}, {p.AdditionalHeader, p.SkipAdditional}}
	for _, sec := range sections {
		for {
			rh, err := sec.header()
			if errors.Is(err, dnsmessage.ErrSectionDone) {
				break
			}
			if err != nil {
				return mdnsPacket{}, fmt.Errorf("%w: record: %v", errMalformed, err)
			}
			if count++; count > mdnsMaxRecords {
				return mdnsPacket{}, fmt.Errorf("%w: more than %d records", errMalformed, mdnsMaxRecords)
			}
			rr := mdnsRR{name: lowerName(rh.Name).String(), typ: rh.Type, ttl: heardTTL(rh.TTL), flush: rh.Class&classFlush != 0}
			if rh.Class&^classFlush != dnsmessage.ClassINET && rh.Class&^classFlush != dnsmessage.ClassANY {
				if err := sec.skip(); err != nil {
					return mdnsPacket{}, fmt.Errorf("%w: record: %v", errMalformed, err)
				}
				continue
			}
			switch rh.Type {
			case dnsmessage.TypePTR:
				r, err := p.PTRResource()
				if err != nil {
					return mdnsPacket{}, fmt.Errorf("%w: PTR: %v", errMalformed, err)
				}
				rr.target = lowerName(r.PTR).String()
			case dnsmessage.TypeSRV:
				r, err := p.SRVResource()
				if err != nil {
					return mdnsPacket{}, fmt.Errorf("%w: SRV: %v", errMalformed, err)
				}
				rr.target, rr.port = lowerName(r.Target).String(), r.Port
			case dnsmessage.TypeTXT:
				r, err := p.TXTResource()
				if err != nil {
					return mdnsPacket{}, fmt.Errorf("%w: TXT: %v", errMalformed, err)
				}
				rr.txt = r.TXT
			case dnsmessage.TypeA:
				r, err := p.AResource()
				if err != nil {
					return mdnsPacket{}, fmt.Errorf("%w: A: %v", errMalformed, err)
				}
				rr.addr = netip.AddrFrom4(r.A)
			case dnsmessage.TypeAAAA:
				r, err := p.AAAAResource()
				if err != nil {
					return mdnsPacket{}, fmt.Errorf("%w: AAAA: %v", errMalformed, err)
				}
				rr.addr = netip.AddrFrom16(r.AAAA).Unmap()
			default:
				if err := sec.skip(); err != nil {
					return mdnsPacket{}, fmt.Errorf("%w: record: %v", errMalformed, err)
				}
				continue
			}
			pkt.records = append(pkt.records, rr)
		}
	}
	return pkt, nil
}

// heardTTL is the TTL of a record heard: capped at mdnsMaxTTL, and 0 (a
// goodbye) when its top bit is set, as RFC 2181 section 8 has such values
// read.
func heardTTL(ttl uint32) uint32 {
	if ttl&(1<<31) != 0 {
		return 0
	}
	return min(ttl, mdnsMaxTTL)
}

// lowerName lower-cases the ASCII letters of a name.
func lowerName(n dnsmessage.Name) dnsmessage.Name {
	for i := 0; i < int(n.Length); i++ {
		if c := n.Data[i]; 'A' <= c && c <= 'Z' {
			n.Data[i] = c + 'a' - 'A'
		}
	}
	return n
}

// instanceOf returns whether name is an instance of our service type: one
// label followed by mdnsServiceType (subtype names have more).
func instanceOf(name string) bool {
	label, ok := strings.CutSuffix(name, "."+mdnsServiceType)
	return ok && label != "" && !strings.Contains(label, ".")
}

// answer is the response to the questions of one query from the local
// announcements: answers and additional records (RFC 6763 section 12),
// less the PTRs the querier listed as known with at least half our TTL left
// (RFC 6762 section 7.1). legacy answers a legacy unicast query (section
// 6.7). Question names come lower-cased from parsePacket.
func answer(qs []dnsmessage.Question, known []mdnsRR, locals []mdnsAnnouncement, ttl func(mdnsAnnouncement) uint32, legacy bool) (answers, extra []dnsmessage.Resource) {
	knownPTR := map[string]uint32{}
	for _, k := range known {
		if k.typ == dnsmessage.TypePTR {
			knownPTR[k.name+" "+k.target] = k.ttl
		}
	}
	seen := map[string]bool{} // name and type: nothing is sent twice
	add := func(to *[]dnsmessage.Resource, r dnsmessage.Resource) {
		k := strings.ToLower(r.Header.Name.String()) + " " + typeOf(r).String()
		if !seen[k] {
			seen[k] = true
			*to = append(*to, r)
		}
	}
	ttlOf := func(a mdnsAnnouncement) uint32 {
		if legacy {
			return min(ttl(a), mdnsLegacyTTL)
		}
		return ttl(a)
	}
	for _, q := range qs {
		name, qt := q.Name.String(), q.Type
		wants := func(t dnsmessage.Type) bool { return qt == t || qt == dnsmessage.TypeALL }
		for _, a := range locals {
			t := ttlOf(a)
			ptr, unique := a.resources(t, legacy)
			switch {
			case name == mdnsServicesEnum && wants(dnsmessage.TypePTR):
				add(&answers, dnsmessage.Resource{
					Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(mdnsServicesEnum), Class: dnsmessage.ClassINET, TTL: t},
					Body:   &dnsmessage.PTRResource{PTR: dnsmessage.MustNewName(mdnsServiceType)},
				})
			case name == mdnsServiceType && wants(dnsmessage.TypePTR):
				if kt, ok := knownPTR[mdnsServiceType+" "+strings.ToLower(a.instance)]; ok && kt >= t/2 {
					continue
				}
				add(&answers, ptr)
				for _, r := range unique {
					add(&extra, r)
				}
			case name == strings.ToLower(a.instance):
				for _, r := range unique {
					if r.Header.Name.String() == a.instance && wants(typeOf(r)) {
						add(&answers, r)
					}
				}
				for _, r := range unique {
					if r.Header.Name.String() != a.instance {
						add(&extra, r)
					}
				}
			case a.addr.IsValid() && name == strings.ToLower(a.host):
				for _, r := range unique {
					if r.Header.Name.String() == a.host && wants(typeOf(r)) {
						add(&answers, r)
					}
				}
			}
		}
	}
	return answers, extra
}

func typeOf(r dnsmessage.Resource) dnsmessage.Type {
	switch r.Body.(type) {
	case *dnsmessage.PTRResource:
		return dnsmessage.TypePTR
	case *dnsmessage.SRVResource:
		return dnsmessage.TypeSRV
	case *dnsmessage.TXTResource:
		return dnsmessage.TypeTXT
	case *dnsmessage.AResource:
		return dnsmessage.TypeA
	case *dnsmessage.AAAAResource:
		return dnsmessage.TypeAAAA
	}
	return 0
}

// packResponses cuts answers into packets of about mdnsPacketTarget bytes,
// keeping each answer with the additional records that belong to it (those
// listed in extra after it, up to the next answer's). It is used for a
// response to a browse of many local nodes.
func packResponses(h dnsmessage.Header, qs []dnsmessage.Question, groups [][2][]dnsmessage.Resource) ([][]byte, error) {
	var out [][]byte
	var ans, ext []dnsmessage.Resource
	var last []byte
	for _, g := range groups {
		msg, err := buildMessage(h, qs, append(append([]dnsmessage.Resource{}, ans...), g[0]...), append(append([]dnsmessage.Resource{}, ext...), g[1]...))
		if err != nil {
			return nil, err
		}
		if len(msg) > mdnsPacketTarget && len(ans) > 0 {
			out = append(out, last)
			ans, ext = nil, nil
			if msg, err = buildMessage(h, qs, g[0], g[1]); err != nil {
				return nil, err
			}
		}
		ans = append(ans, g[0]...)
		ext = append(ext, g[1]...)
		last = msg
	}
	if last != nil {
		out = append(out, last)
	}
	return out, nil
}
