#!/usr/bin/env bash
# Runs the JUnit tests (Maven Surefire) of the Java SDK, then of its example plugin, offline
# when the local repository allows. The example builds against the SDK in ~/.m2, so the SDK
# is installed on the way (`mvn install` runs its tests), as build.sh does.
set -euo pipefail
cd "$(dirname "$0")"
offline=()
if [[ -f target/.offline-ok && ! pom.xml -nt target/.offline-ok && ! example/pom.xml -nt target/.offline-ok ]]; then
  offline=(-o)
fi
mvn -B "${offline[@]}" install
exec mvn -B "${offline[@]}" -f example/pom.xml test
