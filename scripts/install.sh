#!/usr/bin/env bash
# Set up everything the pipeline needs on a fresh Debian machine; safe to run again (a stamp skips
# finished work). Pins are exact here; pyproject.toml declares the compatible ranges for clusters.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PIPELINE_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

# torch and torchvision first, pinned together: an unpinned install pulls other multi-GB builds.
# deepspeed after torch, without build isolation, so it builds against this torch and never upgrades it;
# DS_BUILD_SHM_COMM prebuilds the CPU communication op that otherwise compiles on first use (~40 s).
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
DEEPSPEED_PIN=deepspeed==0.19.8
OTHER_PINS=(submitit==1.5.4 webdataset==1.0.2 "numpy>=1.26,<3" tqdm==4.67.1 matplotlib==3.10.7 tensorboard==2.21.0
            timm==1.0.31 torchcodec==0.17.0 scipy==1.16.3 pytest==8.4.2)
DEBIAN_PACKAGES=(dataset-fashion-mnist)

stamp="$venv/.pipeline-install"
want="$(cat "$root/scripts/install.sh" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"

missing_debs=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing_debs+=("$pkg")
done
if ((${#missing_debs[@]})); then
  echo "install: Debian packages ${missing_debs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

# The environment takes ~5.6 GiB (torch's CUDA build and its NVIDIA libraries; the measured peak while
# installing is the same). Refuse before pip starts rather than leave a half-written one on a full disk.
need_gib=7
target="$venv"
while [[ ! -d "$target" ]]; do target="$(dirname "$target")"; done
free_kib="$(df -Pk "$target" | awk 'NR == 2 {print $4}')"
if ((free_kib < need_gib * 1024 * 1024)); then
  echo "install: the Python environment needs about $need_gib GiB free, but the filesystem of $target has" \
       "$((free_kib / 1024 / 1024)) GiB. Free space there, or set PIPELINE_VENV to a directory on a larger" \
       "filesystem." >&2
  exit 1
fi
echo "install: Python environment in $venv (first run takes about two minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "${TORCH_PINS[@]}"
"${pip[@]}" "${OTHER_PINS[@]}"
DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${pip[@]}" --no-build-isolation "$DEEPSPEED_PIN"
"${pip[@]}" --no-deps --no-build-isolation -e "$root"
"$venv/bin/python" - <<'PY'
import deepspeed, submitit, torch, torchvision, webdataset  # noqa: F401  fail here, not in a job
from torchvision.io import decode_jpeg  # noqa: F401  the C++ image ops must load on this machine
from timm.optim.lars import Lars  # noqa: F401  optim.kind=lars
from torchcodec.decoders import decode_jpeg  # noqa: F401,F811  pipeline.data.decode's decoder
PY
echo "$want" > "$stamp"
