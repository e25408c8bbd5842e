// Command coredns is CoreDNS with only the plugins the real node's cluster DNS uses
// (hack/realnode.py): the Corefile lives in hack/nodedns.py.
//
// A plugin takes part when its package is imported (its init registers its setup function) and
// its name is in dnsserver.Directives (set with SetDirectives), whose order is the order every query passes the plugins in,
// whatever the order in the Corefile. The upstream list (core/dnsserver/zdirectives.go, generated
// from plugin.cfg) puts `template` before `kubernetes`; here `template` comes last, so it answers
// only what `kubernetes` passed on: names outside its zones, NXDOMAIN at once (no upstream here).
package main

import (
	"log"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

// directives in execution order (upstream's relative order, but `template` after `kubernetes`).
var directives = []string{
	"errors",
	"health",
	"ready",
	"loadbalance",
	"cache",
	"kubernetes",
	"template",
}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		log.Fatalf("coredns: %v", err)
	}
	coremain.Run()
}
