#!/usr/bin/env bash
# PostgreSQL on 127.0.0.1:5432 for the team-server tests of tests/test_copy.py (`mlflow server` keeping its store
# there): Debian's `postgresql`, its cluster run by the postgres user, a role `sweep` (password `sweep`) that may
# create databases, and a database `sweep` it owns. Prints nothing on success. Idempotent.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q . || pg_createcluster "$version" main >/dev/null
pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online ||
  pg_ctlcluster "$version" main start
sql() { (cd / && runuser -u postgres -- psql -qAtX -v ON_ERROR_STOP=1 -c "$1"); }
[ "$(sql "SELECT 1 FROM pg_roles WHERE rolname = 'sweep'")" = 1 ] || sql "CREATE ROLE sweep LOGIN CREATEDB PASSWORD 'sweep'"
[ "$(sql "SELECT 1 FROM pg_database WHERE datname = 'sweep'")" = 1 ] || sql "CREATE DATABASE sweep OWNER sweep"
