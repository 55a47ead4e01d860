// A hostile subprocess plugin for the sandbox tests (tests/test_subprocess_sandbox.py): it
// dials out, reads and writes where it should not, reads variables, forks without end,
// holds every inotify instance its uid may have, calls ptrace, makes namespaces of its
// own, fills its /tmp and swaps its socket for a symlink to a host socket.
// Built with the Go SDK so it needs nothing in its sandbox but its own file.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/linchkit/dispatcher/sdk/go/plugin"
)

type pathParams struct {
	Path string `json:"path" plugin:"required"`
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "linger" { // a child of spawn: lives until killed
		time.Sleep(time.Minute)
		return
	}
	p := plugin.New("hostile", "1.0.0")

	p.Method("whoami", "uid, pid and no_new_privs of the plugin", func(_ context.Context, _ *plugin.Call) (any, error) {
		status, _ := os.ReadFile("/proc/self/status")
		noNewPrivs := ""
		for _, line := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(line, "NoNewPrivs:") {
				noNewPrivs = strings.TrimSpace(strings.TrimPrefix(line, "NoNewPrivs:"))
			}
		}
		return map[string]any{"uid": os.Getuid(), "pid": os.Getpid(), "no_new_privs": noNewPrivs}, nil
	})

	p.Method("connect", "dials address over TCP", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Address string `json:"address" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		conn, err := net.DialTimeout("tcp", params.Address, 2*time.Second)
		if err != nil {
			return nil, plugin.NewError("NetworkError", err.Error())
		}
		_, _ = conn.Write([]byte("escaped"))
		_ = conn.Close()
		return "connected", nil
	})

	p.Method("read", "the content of path", func(_ context.Context, call *plugin.Call) (any, error) {
		var params pathParams
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		content, err := os.ReadFile(params.Path)
		if err != nil {
			return nil, plugin.NewError("FileError", err.Error())
		}
		return string(content), nil
	})

	p.Method("write", "writes to path", func(_ context.Context, call *plugin.Call) (any, error) {
		var params pathParams
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		if err := os.WriteFile(params.Path, []byte("written by the plugin"), 0o644); err != nil {
			return nil, plugin.NewError("FileError", err.Error())
		}
		return true, nil
	})

	p.Method("env", "the value of variable name, or null", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Name string `json:"name" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		if value, ok := os.LookupEnv(params.Name); ok {
			return value, nil
		}
		return nil, nil
	})

	p.Method("spawn", "starts up to n processes, counts those that started, ends them (or, with hold, keeps all but two a minute)", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			N    int  `json:"n" plugin:"required"`
			Hold bool `json:"hold"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		// Threads count against the limit too: while the children hold it, a runtime that
		// needs a new thread (a blocking call handing its P on, on a loaded machine) dies
		// ("failed to create new OS thread") and the host saw a reset instead of an answer.
		// Threads made before are kept idle for it.
		spareThreads(4)
		var started []*exec.Cmd
		failure := ""
		for range params.N {
			child := exec.Command("/proc/self/exe", "linger")
			if err := child.Start(); err != nil {
				failure = err.Error()
				break
			}
			started = append(started, child)
		}
		ending := started
		if params.Hold && len(started) > 2 {
			// Two ended, so that the Go runtime can still start a thread to answer: at the
			// limit itself it dies ("failed to create new OS thread").
			ending = started[len(started)-2:]
		}
		for _, child := range ending {
			_ = child.Process.Kill()
			_ = child.Wait()
		}
		return map[string]any{"started": len(started), "error": failure}, nil
	})

	p.Method("swap_socket", "replaces its socket with a symlink to address, then drops the host's connections", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Address string `json:"address" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		sockets, _ := filepath.Glob(filepath.Join(os.Getenv("LINCHKIT_PLUGIN_SOCKET_DIR"), "*.sock"))
		if len(sockets) != 1 {
			return nil, plugin.NewError("FileError", fmt.Sprintf("expected one socket, found %v", sockets))
		}
		// Moved aside, not removed: it still listens, for a host that kept hold of it.
		if err := os.Rename(sockets[0], sockets[0]+".moved"); err != nil {
			return nil, plugin.NewError("FileError", err.Error())
		}
		if err := os.Symlink(params.Address, sockets[0]); err != nil {
			return nil, plugin.NewError("FileError", err.Error())
		}
		go func() { // after this answer has gone: the host must dial the path again
			time.Sleep(200 * time.Millisecond)
			dropConnections()
		}()
		return sockets[0], nil
	})

	p.Method("inotify", "opens inotify instances until refused, counts them, closes them (or, with hold, keeps them)", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Hold bool `json:"hold"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		var opened []int
		failure := ""
		for len(opened) < 1000 {
			fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC)
			if err != nil {
				failure = err.Error()
				break
			}
			opened = append(opened, fd)
		}
		if !params.Hold {
			for _, fd := range opened {
				_ = syscall.Close(fd)
			}
		}
		return map[string]any{"opened": len(opened), "error": failure}, nil
	})

	p.Method("ptrace", "calls ptrace(PTRACE_TRACEME)", func(_ context.Context, _ *plugin.Call) (any, error) {
		_, _, errno := syscall.Syscall(syscall.SYS_PTRACE, syscall.PTRACE_TRACEME, 0, 0)
		return fmt.Sprintf("ptrace returned errno %d", errno), nil
	})

	p.Method("io_uring", "sets up an io_uring", func(_ context.Context, _ *plugin.Call) (any, error) {
		var params [120]byte                                                            // struct io_uring_params, zeroed
		fd, _, errno := syscall.Syscall(425, 1, uintptr(unsafe.Pointer(&params[0])), 0) // io_uring_setup
		if errno != 0 {
			return map[string]any{"created": false, "errno": int(errno)}, nil
		}
		_ = syscall.Close(int(fd))
		return map[string]any{"created": true, "errno": 0}, nil
	})

	p.Method("namespace", "clone(2)s a child into new user and network namespaces", func(_ context.Context, _ *plugin.Call) (any, error) {
		// What unshare(2) does, by the other door: a user namespace of its own gives the
		// child every capability there (a network namespace to configure, nftables...).
		flags := uintptr(syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET | uintptr(syscall.SIGCHLD))
		pid, _, errno := syscall.RawSyscall6(syscall.SYS_CLONE, flags, 0, 0, 0, 0, 0)
		if errno != 0 {
			return map[string]any{"created": false, "error": errno.Error()}, nil
		}
		if pid == 0 {
			syscall.RawSyscall(syscall.SYS_EXIT_GROUP, 0, 0, 0)
		}
		var status syscall.WaitStatus
		_, _ = syscall.Wait4(int(pid), &status, 0, nil)
		return map[string]any{"created": true, "error": ""}, nil
	})

	p.Method("fill", "writes mb MiB into path, keeps it, reports how much was written", func(_ context.Context, call *plugin.Call) (any, error) {
		var params struct {
			Path string `json:"path" plugin:"required"`
			MB   int    `json:"mb" plugin:"required"`
		}
		if err := call.Bind(&params); err != nil {
			return nil, err
		}
		file, err := os.Create(params.Path)
		if err != nil {
			return nil, plugin.NewError("FileError", err.Error())
		}
		defer file.Close()
		block := make([]byte, 1<<20)
		written := 0
		failure := ""
		for written < params.MB {
			if _, err := file.Write(block); err != nil {
				failure = err.Error()
				break
			}
			written++
		}
		return map[string]any{"mb": written, "error": failure}, nil
	})

	p.Serve()
}

// dropConnections shuts down every connected socket of the process (the host's
// connections to its gRPC server), leaving the listening one serving.
func dropConnections() {
	entries, _ := os.ReadDir("/proc/self/fd")
	for _, entry := range entries {
		fd, err := strconv.Atoi(entry.Name())
		if err != nil {
			continue
		}
		if target, _ := os.Readlink("/proc/self/fd/" + entry.Name()); !strings.HasPrefix(target, "socket:") {
			continue
		}
		if listening, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN); err != nil || listening == 1 {
			continue
		}
		_ = syscall.Shutdown(fd, syscall.SHUT_RDWR)
	}
}

// spareThreads leaves at least n idle OS threads in the Go runtime, which never ends an idle
// one: n goroutines, each locked to a thread of its own, wait together, then unlock.
func spareThreads(n int) {
	var ready sync.WaitGroup
	release := make(chan struct{})
	ready.Add(n)
	for range n {
		go func() {
			runtime.LockOSThread()
			ready.Done()
			<-release
			runtime.UnlockOSThread()
		}()
	}
	ready.Wait()
	close(release)
}
