package main

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// appRegistration keeps the app's own entry in the registry while the app
// belongs there (it passes its check, or has none). A write the registry
// refuses (etcd unreachable, the table full) is tried again, with a
// backoff from retryMin up to retryMax, until it goes through or the app is
// taken out: unlike a client of the registry API, the app has nobody to
// retry for it. Once written, the entry is the registry's to refresh.
type appRegistration struct {
	reg      *registry
	app      Service
	id       string
	log      *slog.Logger
	retryMin time.Duration
	retryMax time.Duration

	writeMu   sync.Mutex // held across a write, so that up, down and retries stay in order
	mu        sync.Mutex // guards want, pending, refusedOp and verdict; never held across a write, which /health would wait on
	want      bool       // the app belongs in the registry
	pending   error      // the last write's refusal, while a retry is due
	refusedOp string     // what pending refused ("registering", "deregistering"), as logged
	verdict   *bool      // the health checks' latest verdict, until run applies it
	writing   atomic.Bool
	kick      chan struct{} // a refused write: start the retry backoff
	checked   chan struct{} // a verdict waits
}

func newAppRegistration(reg *registry, app Service, id string, log *slog.Logger, retryMax time.Duration) *appRegistration {
	return &appRegistration{reg: reg, app: app, id: id, log: log,
		retryMin: time.Second, retryMax: max(retryMax, time.Second), kick: make(chan struct{}, 1), checked: make(chan struct{}, 1)}
}

// up registers the app, or arms a retry when the registry refuses.
func (a *appRegistration) up() {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	a.mu.Lock()
	a.want = true
	a.mu.Unlock()
	a.log.Info("Registering "+a.id, "service", a.app.Name, "address", a.app.Nodes[0].hostPort()) // appService makes one node
	a.write()
}

// down takes the app out, calls off any retry of its registration, and
// arms one of its removal when the registry refuses that: an app that
// fails its checks must not stay discoverable for the rest of its TTL.
func (a *appRegistration) down() {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	a.mu.Lock()
	a.want, a.pending = false, nil
	a.mu.Unlock()
	a.log.Info("Deregistering "+a.id, "service", a.app.Name)
	a.erase()
}

// erase makes one attempt at taking the app out; writeMu is held. The
// node id is the app's, under any version: an earlier run's entry under
// the version it had (an upgrade keeping --server_id) goes too, where a
// version named would keep it (the file registry's DELETE rule).
func (a *appRegistration) erase() {
	anyVersion := a.app
	anyVersion.Version = ""
	a.settle(a.reg.Deregister(anyVersion), "deregistered", "deregistering")
}

// follow hands the health checks' verdict to run, which keeps the
// registration in step with it: in when they pass, out when they fail
// after having passed. A registry write may take seconds (etcd's timeout,
// a file lock held elsewhere), and the checks must go on meanwhile; of
// verdicts that come faster than writes, the latest counts.
func (a *appRegistration) follow(passing bool) {
	a.mu.Lock()
	a.verdict = &passing
	a.mu.Unlock()
	select {
	case a.checked <- struct{}{}:
	default: // run has one to apply already, and reads the latest
	}
}

// apply applies the latest verdict of the health checks, if any.
func (a *appRegistration) apply() {
	a.mu.Lock()
	v, in := a.verdict, a.want
	a.verdict = nil
	a.mu.Unlock()
	switch {
	case v == nil:
	case *v:
		a.up()
	case in:
		a.down()
	case a.reg.goodbyeUnheard(a.app):
		// mdns: an earlier run's entry is in every other cache unheard
		// here (nobody answers for a killed sidecar's nodes), and one
		// heard has a live owner (a rolling restart's old sidecar); see
		// mdnsBackend.goodbyeUnheard.
	case a.reg.table.holds(a.app.Name, a.id):
		// An entry under the app's node id that this sidecar did not
		// write: an earlier run's (killed with a fixed --server_id), which
		// would send callers to a failing app until its TTL ran out.
		a.log.Info("the app is failing and an earlier run left its entry in the registry; removing it", "id", a.id)
		a.down()
	}
}

// write makes one attempt; writeMu is held.
func (a *appRegistration) write() {
	a.writing.Store(true)
	err := a.reg.registerOwn(a.app)
	a.writing.Store(false)
	a.settle(err, "registered", "registering")
}

// settle keeps err as the refusal a retry is due for, says when that
// changes (a refusal once, and the late success), and starts the retry
// loop's backoff on a refusal.
func (a *appRegistration) settle(err error, done, doing string) {
	a.mu.Lock()
	was, wasOp := a.pending, a.refusedOp
	a.pending, a.refusedOp = err, doing
	a.mu.Unlock()
	switch {
	case err == nil && was != nil:
		a.log.Info(done+" "+a.id+" after the registry refused it", "service", a.app.Name)
	case err != nil && (was == nil || wasOp != doing):
		// Said again for the other write: the app came back while its
		// removal was refused, and its registration is retried now.
		a.log.Error(doing+" the app failed; retrying until it succeeds", "error", err)
	}
	if err != nil {
		select {
		case a.kick <- struct{}{}: // the retry loop starts its backoff
		default:
		}
	}
}

// callOff ends a retry of the app's registration after a DELETE of its
// node through the API, which is final until the app's health changes.
func (a *appRegistration) callOff() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.want {
		a.pending = nil
	}
}

// refused returns the registry's refusal of the app's registration, or of
// its removal, while a retry is due.
func (a *appRegistration) refused() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pending
}

// registered reports whether the app's entry is in the registry as this
// sidecar keeps it: not while its write is under way, nor after a refusal,
// nor after a DELETE through the API, nor once the entry lapsed (its
// refreshes refused: in the table, until the registry answers again, it
// may not be in the registry) or another sidecar removed it.
func (a *appRegistration) registered() bool {
	return !a.writing.Load() && a.reg.owns(a.app) && a.reg.table.holds(a.app.Name, a.id) &&
		!a.reg.lapsed(record{Service: a.app.Name, Node: Node{ID: a.id}}.key())
}

// names reports whether s holds the app's own node.
func (a *appRegistration) names(s Service) bool {
	if s.Name != a.app.Name {
		return false
	}
	for _, n := range s.Nodes {
		if n.ID == a.id {
			return true
		}
	}
	return false
}

// run applies the checks' verdicts and retries refused registrations and
// removals until ctx ends.
func (a *appRegistration) run(ctx context.Context) {
	wait := a.retryMin
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.checked:
			a.apply()
		case <-a.kick:
			wait = a.retryMin
			timer.Reset(wait)
		case <-timer.C:
			a.writeMu.Lock()
			a.mu.Lock()
			due, want := a.pending != nil, a.want
			a.mu.Unlock()
			if due {
				if want {
					a.write()
				} else {
					a.erase()
				}
				wait = min(2*wait, a.retryMax)
				timer.Reset(wait)
			}
			a.writeMu.Unlock()
			// A write that failed again kicked: drop that, the backoff goes on.
			select {
			case <-a.kick:
			default:
			}
		}
	}
}
