#!/usr/bin/env bash
# Builds the Java SDK and its example plugin from Maven Central, running their JUnit tests on
# the way (SKIP_TESTS=1 skips them): installs the SDK jar in ~/.m2 (as a plugin author does, README), then builds the
# example (example/, a plugin depending on that jar) and leaves sdk/java/dist/example-plugin
# (a wrapper around its one shaded jar).
# Idempotent: with nothing changed since the last good build it returns at once.
set -euo pipefail
cd "$(dirname "$0")"

STAMP=dist/.built
SOURCES=(src pom.xml example/src example/pom.xml build.sh ../../proto/plugin.proto)

if [[ -f $STAMP && -x dist/example-plugin && -f dist/example-plugin.jar ]] \
  && [[ -z $(find "${SOURCES[@]}" -newer "$STAMP" -print -quit) ]]; then
  echo "sdk/java: up to date"
  exit 0
fi

# Class-data sharing (AppCDS): one training launch in subprocess mode, with AutoMTLS when
# openssl can make a host certificate, records the classes a start loads; later starts map
# them instead of loading them again (about a third less time to the handshake line).
# Best effort: without the archive the plugin starts all the same.
train_class_data_archive() {
  rm -f dist/example-plugin.jsa
  local tmp pid line=""
  tmp=$(mktemp -d)
  # With a trace collector named, so the archive holds OpenTelemetry's classes and the JDK
  # HttpClient's as well: a traced plugin starts as fast as an untraced one nearly. No call is
  # made, so no span is sent (nothing listens there); an untraced start loads none of them.
  local -a env=(LINCHKIT_PLUGIN_MAGIC_COOKIE=d1spatch3r-pl4g1n "LINCHKIT_PLUGIN_SOCKET_DIR=$tmp"
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:9/v1/traces)
  if openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=host \
      -keyout "$tmp/host.key" -out "$tmp/host.pem" >/dev/null 2>&1; then
    env+=("LINCHKIT_PLUGIN_CLIENT_CERT=$(cat "$tmp/host.pem")")
  fi
  mkfifo "$tmp/stdin"
  # Absolute paths: a JVM maps the archive only when started with the very class path it
  # records, and the wrapper starts the jar by its absolute path from wherever it is run.
  local dist
  dist="$(pwd -P)/dist"
  env "${env[@]}" java -Xlog:disable -Xlog:all=warning:stderr -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -XX:ArchiveClassesAtExit="$dist/example-plugin.jsa" -jar "$dist/example-plugin.jar" \
    <"$tmp/stdin" >"$tmp/stdout" 2>"$tmp/stderr" &
  pid=$!
  exec 3>"$tmp/stdin"
  for _ in $(seq 600); do
    line=$(head -n1 "$tmp/stdout")
    [[ -n $line ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  exec 3>&- # end-of-file on the plugin's stdin: it stops, and the JVM writes the archive
  wait "$pid" || true
  [[ -n $line && -f dist/example-plugin.jsa ]] || { rm -f dist/example-plugin.jsa; echo "sdk/java: no class-data archive (the plugin starts without it)"; }
  rm -rf "$tmp"
}

# Offline once the local repository is known to hold everything these poms need (a build
# with them went through); online otherwise, and when offline fails after all. The SDK is
# installed first: the example resolves it from ~/.m2 like any plugin.
OFFLINE_OK=target/.offline-ok
MVN=(mvn -B -q -Dstyle.color=never)
# Maven's own JVM with C1's code only: a build is over before C2's compiles would pay (a
# third less CPU for a plugin's test and package). Yours wins when set.
export MAVEN_OPTS="${MAVEN_OPTS:--XX:TieredStopAtLevel=1 -XX:+UseSerialGC}"
# SKIP_TESTS=1 skips the JUnit tests, as the other SDKs' build.sh do.
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  MVN+=(-DskipTests)
fi
maven() { # maven ARGS...: offline when known to work, else online
  if [[ -f $OFFLINE_OK && ! pom.xml -nt $OFFLINE_OK && ! example/pom.xml -nt $OFFLINE_OK ]] \
    && "${MVN[@]}" -o "$@"; then
    return 0
  fi
  "${MVN[@]}" "$@"
}
maven install
# The example's jar anew: with only the SDK changed, maven-jar-plugin keeps the last jar, which
# the shade plugin had already filled with the old SDK's classes, and shading it again keeps
# those over the new ones (the first copy of a class wins).
rm -f example/target/example-plugin.jar example/target/original-example-plugin.jar
maven -f example/pom.xml package
touch "$OFFLINE_OK"
grep -h 'Tests run' target/surefire-reports/*.txt example/target/surefire-reports/*.txt 2>/dev/null || true

rm -f "$STAMP"
mkdir -p dist
cp example/target/example-plugin.jar dist/example-plugin.jar
cat > dist/example-plugin <<'WRAPPER'
#!/bin/sh
# The Java example plugin (built by sdk/java/build.sh). JVM warnings go to stderr, never to
# the stdout that carries the handshake line; SerialGC suits a small heap on a shared box;
# the class-data archive, when the build made one, shortens the start. It records the jar's
# absolute path: with the folder moved, the JVM warns once and starts without it.
# C1's code only (TieredStopAtLevel=1): the example is started often and lives briefly (a
# launch per subprocess target, again after a crash or a reload; the demo, the conformance
# suite), and C2's compiles were most of what it spent past its start: the Java conformance
# cases took 251 s of CPU with both compilers, 180 s with C1 alone. A plugin that serves a
# heavy load for hours gains from C2: JAVA_OPTS, given last, overrides
# (JAVA_OPTS=-XX:TieredStopAtLevel=4; a subprocess target passes it in its `env`).
dir=$(cd "$(dirname "$0")" && pwd -P)
cds=
[ -f "$dir/example-plugin.jsa" ] && cds="-XX:SharedArchiveFile=$dir/example-plugin.jsa"
# shellcheck disable=SC2086 # $JAVA_OPTS: options, split as the shell splits words
exec java -Xlog:disable -Xlog:all=warning:stderr -XX:+UseSerialGC -XX:TieredStopAtLevel=1 $cds \
  ${JAVA_OPTS:-} -jar "$dir/example-plugin.jar" "$@"
WRAPPER
chmod +x dist/example-plugin
train_class_data_archive
touch "$STAMP"
echo "sdk/java: built dist/example-plugin"
