#!/usr/bin/env bash
# Generate the Secrets loopserve's manifests expect, with fresh random values. Nothing secret is
# committed to the repository: this script is the template (k8s/secrets/secrets.example.yaml shows
# the resulting shape with placeholders).
#
#   k8s/secrets/make-secrets.sh [-n NAMESPACE] [-o DIR] [--db-url URL] [--tls] [--apply]
#
# Writes into DIR (default ./loopserve-secrets, mode 0700; keep it out of git and somewhere safe):
#   client.token annotator.token admin.token   one bearer token per role, for apps and operators
#   tokens.json                                {token: role} for the policy and reward services
#   trainer-tokens.json                        the client and admin tokens only, for the trainer
#   tls/ca.crt ca.key tls.crt tls.key          with --tls: a private CA and the policy server's cert
#   secrets.yaml                               the Secret manifests (loopserve-tokens,
#                                              loopserve-trainer-token, loopserve-db[, loopserve-tls])
# and, with --apply, applies secrets.yaml with kubectl. Re-running makes new values: apply them, then
# restart the pods (`kubectl rollout restart deploy -n NAMESPACE`) since tokens are read at start.
#
# --db-url URL   use an external PostgreSQL (with k8s/components/external-db) instead of the bundled
#                one; otherwise a random password and the in-cluster URL are generated.
# --tls          also make the TLS Secret for k8s/components/tls. For production, issue it from your
#                own CA or cert-manager instead (same keys: tls.crt, tls.key, ca.crt).
#
# Needs: bash, openssl, kubectl (offline is fine: it only renders with --dry-run=client).
set -euo pipefail

namespace=loopserve
out=./loopserve-secrets
db_url=""
tls=0
apply=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --namespace) namespace="$2"; shift 2 ;;
    -o | --out) out="$2"; shift 2 ;;
    --db-url) db_url="$2"; shift 2 ;;
    --tls) tls=1; shift ;;
    --apply) apply=1; shift ;;
    -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

umask 077
mkdir -p "$out"
chmod 700 "$out"

token() { openssl rand -hex 32; }

for role in client annotator admin; do
  token >"$out/$role.token"
done
client=$(<"$out/client.token")
annotator=$(<"$out/annotator.token")
admin=$(<"$out/admin.token")
printf '{\n  "%s": "client",\n  "%s": "annotator",\n  "%s": "admin"\n}\n' \
  "$client" "$annotator" "$admin" >"$out/tokens.json"
# The trainer scores with the client token and holds the admin token for ModelAdmin; not the annotator's.
printf '{\n  "%s": "client",\n  "%s": "admin"\n}\n' "$client" "$admin" >"$out/trainer-tokens.json"

db_args=()
if [[ -z "$db_url" ]]; then
  password=$(openssl rand -hex 24) # hex: nothing to escape in a URL
  db_url="postgresql://loopserve:${password}@loopserve-postgres.${namespace}.svc.cluster.local:5432/loopserve"
  db_args+=(--from-literal=password="$password")
fi
db_args+=(--from-literal=url="$db_url")

render() { kubectl create secret generic "$@" --namespace "$namespace" --dry-run=client -o yaml; }

{
  render loopserve-tokens --from-file=tokens.json="$out/tokens.json"
  echo "---"
  render loopserve-trainer-token --from-file=tokens.json="$out/trainer-tokens.json"
  echo "---"
  render loopserve-db "${db_args[@]}"
} >"$out/secrets.yaml"

if [[ $tls == 1 ]]; then
  mkdir -p "$out/tls"
  svc="loopserve-policy"
  sans="DNS:localhost,IP:127.0.0.1,DNS:${svc},DNS:${svc}.${namespace},DNS:${svc}.${namespace}.svc"
  sans+=",DNS:${svc}.${namespace}.svc.cluster.local,DNS:${svc}-headless.${namespace}.svc.cluster.local"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=loopserve private CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/tls/ca.key" -out "$out/tls/ca.crt" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=${svc}.${namespace}.svc" -keyout "$out/tls/tls.key" -out "$out/tls/tls.csr" 2>/dev/null
  # serverAuth for the server; clientAuth too, so the TLS probe can present it under mTLS.
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' \
    "$sans" >"$out/tls/ext.cnf"
  openssl x509 -req -in "$out/tls/tls.csr" -CA "$out/tls/ca.crt" -CAkey "$out/tls/ca.key" \
    -CAcreateserial -days 825 -extfile "$out/tls/ext.cnf" -out "$out/tls/tls.crt" 2>/dev/null
  rm -f "$out/tls/tls.csr" "$out/tls/ext.cnf" "$out/tls/ca.srl"
  {
    echo "---"
    render loopserve-tls --type=kubernetes.io/tls \
      --from-file=tls.crt="$out/tls/tls.crt" --from-file=tls.key="$out/tls/tls.key" \
      --from-file=ca.crt="$out/tls/ca.crt"
  } >>"$out/secrets.yaml"
fi

if [[ $apply == 1 ]]; then
  kubectl apply -f "$out/secrets.yaml"
else
  echo "wrote $out/secrets.yaml; apply it with: kubectl apply -f $out/secrets.yaml"
fi
echo "tokens for callers: $out/client.token (predict), $out/annotator.token (feedback), $out/admin.token (ModelAdmin)"
