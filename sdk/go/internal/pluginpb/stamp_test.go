package pluginpb

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"strings"
	"testing"
)

// The generated code is committed; build.sh regenerates it when the proto changes. This
// fails when someone edited proto/plugin.proto and did not run sdk/go/build.sh.
func TestGeneratedCodeMatchesTheProto(t *testing.T) {
	proto, err := os.ReadFile("../../../../proto/plugin.proto")
	if err != nil {
		t.Fatal(err)
	}
	stamp, err := os.ReadFile("plugin.proto.sha256")
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(proto)
	if hex.EncodeToString(sum[:]) != strings.TrimSpace(string(stamp)) {
		t.Fatal("sdk/go/internal/pluginpb is stale: proto/plugin.proto changed; run sdk/go/build.sh")
	}
}
