#!/bin/sh
# One-shot MinIO set-up run by the `minio-init` service of docker-compose.yml (image minio/mc).
# Creates the engine's bucket and a user that may touch only that bucket, so the engine services
# never hold the MinIO root credentials. Safe to run again: every step is idempotent.
set -eu

: "${MINIO_URL:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${S3_BUCKET:?}" "${ENGINE_S3_ACCESS_KEY:?}" "${ENGINE_S3_SECRET_KEY:?}"

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" > /dev/null
mc mb --ignore-existing "local/$S3_BUCKET"

policy_file="$(mktemp)"
cat > "$policy_file" <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$S3_BUCKET"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
     "Resource": ["arn:aws:s3:::$S3_BUCKET/*"]}
  ]
}
POLICY
mc admin policy create local sam-data-engine "$policy_file"
rm -f "$policy_file"

# `user add` on an existing user only resets its secret key.
mc admin user add local "$ENGINE_S3_ACCESS_KEY" "$ENGINE_S3_SECRET_KEY"
# `policy attach` refuses a policy that is already attached; that is the state we want.
if ! out="$(mc admin policy attach local sam-data-engine --user "$ENGINE_S3_ACCESS_KEY" 2>&1)"; then
  case "$out" in
    *already*) echo "policy sam-data-engine is already attached to the engine user" ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
fi
echo "bucket $S3_BUCKET and the engine user are ready"
