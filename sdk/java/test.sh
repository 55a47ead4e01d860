#!/usr/bin/env bash
# Runs the Java SDK's JUnit tests (Maven Surefire), offline when the local repository allows.
set -euo pipefail
cd "$(dirname "$0")"
if [[ -f target/.offline-ok && ! pom.xml -nt target/.offline-ok ]]; then
  exec mvn -B -o test
fi
exec mvn -B test
