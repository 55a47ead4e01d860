module github.com/linchkit/dispatcher/tests/plugins/wasm_hostile

go 1.26.8

require (
	github.com/extism/go-pdk v1.1.3
	github.com/linchkit/dispatcher/sdk/go v0.0.0
)

replace github.com/linchkit/dispatcher/sdk/go => ../../../sdk/go
