module linchkit.test/capabilityprobe

go 1.22
