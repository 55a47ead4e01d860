#!/usr/bin/python3
"""A plugin that lies in its handshake (tests/test_subprocess_hostile_handshake.py).

Standard library only, so it runs in a sandbox that shows it nothing but /usr. What it
does is chosen by ``HOSTILE``:

    announce      prints ``1|1|$NETWORK|$ADDRESS|grpc|``: an address of its choice
    symlink       makes its socket a symlink to ``$ADDRESS`` and announces the symlink
    long-stdout   writes 200 KB on stdout without a line break
    long-stderr   writes a 200 KB line on stderr, then ``$MARKER``, and exits 3
"""

import os
import sys
import time

mode = os.environ["HOSTILE"]
if mode == "announce":
    print(f"1|1|{os.environ['NETWORK']}|{os.environ['ADDRESS']}|grpc|", flush=True)
elif mode == "symlink":
    planted = os.path.join(os.environ["LINCHKIT_PLUGIN_SOCKET_DIR"], "plugin.sock")
    os.symlink(os.environ["ADDRESS"], planted)
    print(f"1|1|unix|{planted}|grpc|", flush=True)
elif mode == "long-stdout":
    sys.stdout.write("x" * 200_000)
    sys.stdout.flush()
elif mode == "long-stderr":
    sys.stderr.write("y" * 200_000 + "\n")
    sys.stderr.write(os.environ["MARKER"] + "\n")
    sys.stderr.flush()
    sys.exit(3)
time.sleep(60)
