// Command gpu-device-plugin is a minimal Kubernetes device plugin (deviceplugin/v1beta1) for the
// real node of hack/realnode.py, which has no GPU: it advertises COUNT healthy devices of a
// resource (nvidia.com/gpu) to the kubelet and, on Allocate, hands the container the device IDs
// in NVIDIA_VISIBLE_DEVICES as NVIDIA's plugin does. It re-registers when the kubelet restarts
// (the kubelet removes the sockets in its device-plugins directory on start).
//
//	gpu-device-plugin -dir KUBELET_ROOT/device-plugins -resource nvidia.com/gpu -count 1
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	// The kubelet admits pods asking for the resource only once it has this list: registering
	// alone is not enough (a pod admitted in between fails with UnexpectedAdmissionError).
	log.Printf("listed %d devices to the kubelet", len(p.devices))
	<-stream.Context().Done()
	return nil
}

func (p *plugin) GetPreferredAllocation(context.Context, *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	return &pluginapi.PreferredAllocationResponse{}, nil
}

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ",")},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func register(dir, endpoint, resource string) error {
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "kubelet.sock"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: endpoint, ResourceName: resource,
	})
	return err
}

// serve listens on the plugin's socket, registers with the kubelet and returns when the socket
// is removed (the kubelet restarted) or a signal arrives (then it reports done).
func serve(p *plugin, dir, resource string, signals <-chan os.Signal) (done bool) {
	endpoint := "finetune-gpu.sock"
	sock := filepath.Join(dir, endpoint)
	_ = os.Remove(sock)
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Printf("listen %s: %v", sock, err)
		return waitOrDone(signals, 2*time.Second)
	}
	server := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(server, p)
	go func() { _ = server.Serve(lis) }()
	defer server.Stop()
	for {
		// The kubelet empties this directory when it starts: a socket made before that is gone,
		// and registering it again would fail for ever.
		if _, err := os.Stat(sock); err != nil {
			log.Printf("%s is gone before registering: listening again", sock)
			return false
		}
		if err := register(dir, endpoint, resource); err == nil {
			log.Printf("registered %s (%d devices) with the kubelet", resource, len(p.devices))
			break
		} else {
			log.Printf("register: %v", err)
		}
		if waitOrDone(signals, time.Second) {
			return true
		}
	}
	for {
		if waitOrDone(signals, time.Second) {
			return true
		}
		if _, err := os.Stat(sock); err != nil {
			log.Printf("%s is gone (kubelet restart): registering again", sock)
			return false
		}
	}
}

func waitOrDone(signals <-chan os.Signal, d time.Duration) bool {
	select {
	case <-signals:
		return true
	case <-time.After(d):
		return false
	}
}

func main() {
	dir := flag.String("dir", "/var/lib/kubelet/device-plugins", "the kubelet's device-plugins directory")
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource name")
	count := flag.Int("count", 1, "number of devices")
	flag.Parse()
	p := &plugin{}
	for i := 0; i < *count; i++ {
		p.devices = append(p.devices, &pluginapi.Device{ID: fmt.Sprintf("GPU-finetune-%d", i), Health: pluginapi.Healthy})
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	for !serve(p, *dir, *resource, signals) {
	}
}
