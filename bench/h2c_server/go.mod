module linchkit.dev/bench/h2c_server

go 1.24
