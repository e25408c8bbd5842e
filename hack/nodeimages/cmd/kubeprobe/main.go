// Command kubeprobe is the test container of the real-node tier (hack/realnode.py): a static
// program without a shell, packaged as an image like the pause image.
//
//	kubeprobe print TEXT...      print TEXT and exit 0
//	kubeprobe env NAME...        print NAME=value of each environment variable
//	kubeprobe whoami             ask the API server who this pod is (SelfSubjectReview) through
//	                             the `kubernetes` Service, with the ServiceAccount token and CA
//	kubeprobe serve PORT         answer every HTTP request with "hello from POD_NAME"
//	kubeprobe wait               print "waiting", then on SIGTERM write "got SIGTERM" to the
//	                             termination message file and exit 0
//	kubeprobe fail CODE TEXT...  print TEXT on stdout, exit CODE (FallbackToLogsOnError)
//	kubeprobe message CODE TEXT  write TEXT to the termination message file, exit CODE
//	kubeprobe resolve NAME...    look each NAME up (Go's own resolver, /etc/resolv.conf and its
//	                             search path), again until it resolves (30 s at most); print
//	                             "NAME ADDR..." sorted, exit 1 if one never resolved
//	kubeprobe unresolvable NAME...
//	                             look each NAME up once; print "NAME not found in MS ms" or
//	                             "NAME ADDR...", exit 1 if one resolved or failed otherwise
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func terminationPath() string {
	if p := os.Getenv("TERMINATION_MESSAGE_PATH"); p != "" {
		return p
	}
	return "/dev/termination-log"
}

func whoami() error {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return fmt.Errorf("KUBERNETES_SERVICE_HOST/PORT not set: not in a pod")
	}
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s/ca.crt", saDir)
	}
	httpClient := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`)
	url := "https://" + net.JoinHostPort(host, port) + "/apis/authentication.k8s.io/v1/selfsubjectreviews"
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: HTTP %d: %s", url, resp.StatusCode, data)
	}
	var review struct {
		Status struct {
			UserInfo struct {
				Username string `json:"username"`
			} `json:"userInfo"`
		} `json:"status"`
	}
	if err := json.Unmarshal(data, &review); err != nil {
		return err
	}
	fmt.Printf("server %s user %s\n", net.JoinHostPort(host, port), review.Status.UserInfo.Username)
	return nil
}

// resolver is Go's own (no cgo in this static binary either way): it reads /etc/resolv.conf,
// with the search path and ndots the kubelet wrote there.
var resolver = &net.Resolver{PreferGo: true}

func lookup(name string) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := resolver.LookupHost(ctx, name)
	sort.Strings(addrs)
	return addrs, err
}

func resolve(names []string) int {
	code := 0
	for _, name := range names {
		deadline := time.Now().Add(30 * time.Second)
		addrs, err := lookup(name)
		for err != nil && time.Now().Before(deadline) {
			time.Sleep(500 * time.Millisecond)
			addrs, err = lookup(name)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "kubeprobe:", err)
			code = 1
			continue
		}
		fmt.Println(name, strings.Join(addrs, " "))
	}
	return code
}

func unresolvable(names []string) int {
	code := 0
	for _, name := range names {
		start := time.Now()
		addrs, err := lookup(name)
		took := time.Since(start).Milliseconds()
		var dnsErr *net.DNSError
		switch {
		case err == nil:
			fmt.Println(name, strings.Join(addrs, " "))
			code = 1
		case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
			fmt.Printf("%s not found in %d ms\n", name, took)
		default:
			fmt.Fprintf(os.Stderr, "kubeprobe: %v after %d ms\n", err, took)
			code = 1
		}
	}
	return code
}

func exitCode(arg string) int {
	code, err := strconv.Atoi(arg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kubeprobe: exit code %q is not a number\n", arg)
		os.Exit(64)
	}
	return code
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kubeprobe print|env|serve|whoami|wait|fail|message|resolve|unresolvable ...")
		os.Exit(64)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "print":
		fmt.Println(strings.Join(args, " "))
	case "env":
		for _, name := range args {
			fmt.Printf("%s=%s\n", name, os.Getenv(name))
		}
	case "serve":
		if len(args) < 1 {
			os.Exit(64)
		}
		reply := "hello from " + os.Getenv("POD_NAME") + "\n"
		http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, reply) })
		fmt.Println("serving on port", args[0])
		if err := http.ListenAndServe(":"+args[0], nil); err != nil {
			fmt.Fprintln(os.Stderr, "kubeprobe:", err)
			os.Exit(1)
		}
	case "whoami":
		if err := whoami(); err != nil {
			fmt.Fprintln(os.Stderr, "kubeprobe:", err)
			os.Exit(1)
		}
	case "wait":
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM)
		fmt.Println("waiting")
		sig := <-signals
		msg := "got " + map[os.Signal]string{syscall.SIGTERM: "SIGTERM"}[sig]
		fmt.Println(msg)
		if err := os.WriteFile(terminationPath(), []byte(msg), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "kubeprobe:", err)
			os.Exit(1)
		}
	case "fail":
		if len(args) < 1 {
			os.Exit(64)
		}
		fmt.Println(strings.Join(args[1:], " "))
		os.Exit(exitCode(args[0]))
	case "message":
		if len(args) < 1 {
			os.Exit(64)
		}
		if err := os.WriteFile(terminationPath(), []byte(strings.Join(args[1:], " ")), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "kubeprobe:", err)
			os.Exit(1)
		}
		os.Exit(exitCode(args[0]))
	case "resolve":
		os.Exit(resolve(args))
	case "unresolvable":
		os.Exit(unresolvable(args))
	default:
		fmt.Fprintf(os.Stderr, "kubeprobe: unknown command %q\n", os.Args[1])
		os.Exit(64)
	}
}
