#!/usr/bin/env bash
# Builds the Java SDK and its example plugin from Maven Central, running the SDK's JUnit
# tests on the way: leaves sdk/java/dist/example-plugin (a wrapper around one shaded jar).
# Idempotent: with nothing changed since the last good build it returns at once.
set -euo pipefail
cd "$(dirname "$0")"

STAMP=dist/.built
SOURCES=(src pom.xml build.sh ../../proto/plugin.proto)

if [[ -f $STAMP && -x dist/example-plugin && -f dist/example-plugin.jar ]] \
  && [[ -z $(find "${SOURCES[@]}" -newer "$STAMP" -print -quit) ]]; then
  echo "sdk/java: up to date"
  exit 0
fi

# Offline once the local repository is known to hold everything this pom needs (a build
# with this pom went through); online otherwise, and when offline fails after all.
OFFLINE_OK=target/.offline-ok
MVN=(mvn -B -q -Dstyle.color=never)
if [[ -f $OFFLINE_OK && ! pom.xml -nt $OFFLINE_OK ]] && "${MVN[@]}" -o package; then
  :
else
  "${MVN[@]}" package
fi
touch "$OFFLINE_OK"
grep -h 'Tests run' target/surefire-reports/*.txt || true

rm -f "$STAMP"
mkdir -p dist
cp target/example-plugin.jar dist/example-plugin.jar
cat > dist/example-plugin <<'WRAPPER'
#!/bin/sh
# The Java example plugin (built by sdk/java/build.sh). SerialGC: a small heap on a shared box.
exec java -XX:+UseSerialGC -Xss512k -jar "$(dirname "$0")/example-plugin.jar" "$@"
WRAPPER
chmod +x dist/example-plugin
touch "$STAMP"
echo "sdk/java: built dist/example-plugin"
