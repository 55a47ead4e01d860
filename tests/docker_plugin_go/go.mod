module linchkit.test/echoplugin

go 1.22
