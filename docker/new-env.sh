#!/bin/sh
# Write a .env for docker-compose.yml from .env.example, with a fresh random value for every
# variable left empty there (the secrets). Refuses to overwrite an existing file.
#   usage: sh docker/new-env.sh [OUTPUT]     (default: .env next to docker-compose.yml)
set -eu

here="$(cd "$(dirname "$0")/.." && pwd)"
example="$here/.env.example"
out="${1:-$here/.env}"

if [ -e "$out" ]; then
  echo "error: $out exists; remove it first or name another output file" >&2
  exit 1
fi

# 20 random bytes as 40 hex characters: within MinIO's 8-40 and Label Studio's 6-40 limits.
random_secret() {
  od -An -tx1 -N20 /dev/urandom | tr -d ' \n'
}

umask 077
tmp="$out.tmp.$$"
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in
    [A-Z]*=) printf '%s%s\n' "$line" "$(random_secret)" ;;
    *) printf '%s\n' "$line" ;;
  esac
done < "$example" > "$tmp"
mv "$tmp" "$out"
echo "wrote $out (secrets generated; edit the other values as needed)"
