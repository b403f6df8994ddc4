#!/usr/bin/env bash
# The throwaway virtual environment of bench/speed/peers/run.py, OUTSIDE the repository and gaussad's own dependencies:
# never part of `make test`. The CPU torch==2.13.0 goes in first and every pip call below is constrained to it, so that
# no requirement can pull another torch. The peers go in without their declared dependencies (anomalib's would resolve
# freely; AnomaVision's pin numpy 1.26, scikit-learn<1.4, matplotlib 3.8.3, openvino-dev, streamlit, gradio...), then
# the packages their timed code paths import.
#
# torchvision (anomalib and AnomaVision both import it) is the one workaround: the only build PyPI has for this torch,
# torchvision 0.28.0, is a CUDA build (0.28.0+cu130) whose C++ extension links libtorch_cuda.so and libc10_cuda.so,
# absent beside the CPU torch, so `import torchvision` fails with
#     RuntimeError: operator torchvision::nms does not exist
# (its _meta_registrations module registers fake kernels for the C++ ops that did not load). Inside this venv only,
# _meta_registrations.py and _autograd_registrations.py are replaced by empty modules (originals kept as *.orig):
# torchvision's models and transforms are plain Python and import; its C++ ops (nms, roi_align, image decoding) stay
# unavailable, and neither peer's PaDiM or PatchCore uses them.
#
#     bash bench/speed/peers/setup.sh [VENV]        # default /tmp/peers-venv; every step's output in $VENV/setup.log
set -u
VENV=${1:-/tmp/peers-venv}
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
LOG="$VENV/setup.log"
CONSTRAINT="$VENV/torch-constraint.txt"
echo "torch==2.13.0" > "$CONSTRAINT"
step() {  # step DESCRIPTION pip-args...: one pip install, logged; a failure is reported and the script goes on
  local what=$1; shift
  echo "== $what: pip install $*" | tee -a "$LOG"
  if ! $PIP install -c "$CONSTRAINT" "$@" >>"$LOG" 2>&1; then echo "FAILED: $what (see $LOG)" | tee -a "$LOG"; fi
}
step "the CPU torch first" torch==2.13.0
step "the peers, without their dependencies" --no-deps anomalib==2.7.0 anomavision==3.6.2
step "torch-dependent requirements, without theirs" --no-deps "lightning>=2.6,!=2.6.2,!=2.6.3" \
  "pytorch-lightning>=2.6" "torchmetrics>=1.8.2" timm "kornia>=0.6.6" "freia>=0.2" kornia_rs
step "torchvision for this torch (pins torch==2.13.0 itself)" torchvision==0.28.0
step "plain requirements" "numpy<2.5" lightning-utilities "jsonargparse[signatures]>=4.27.7,<4.47.0" \
  docstring-parser "einops>=0.3.2" "omegaconf>=2.1.1" "opencv-python-headless>=4.5.3.56" "pandas>=1.1.0" \
  "pillow>=10.1.0" "platformdirs>=4.9.4" rich-argparse "rich>=13.5.2" scikit-image scikit-learn tifffile imagecodecs \
  "matplotlib>=3.4.3" pyyaml fsspec packaging typing-extensions tqdm huggingface_hub safetensors scipy easydict \
  psutil onnx onnxruntime
TV=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
for module in _meta_registrations _autograd_registrations; do
  [ -f "$TV/$module.py.orig" ] || cp "$TV/$module.py" "$TV/$module.py.orig"
  echo '"""Emptied by gaussad bench/speed/peers/setup.sh: the C++ ops it registers kernels for did not load (CUDA build)."""' \
    > "$TV/$module.py"
done
echo "== torch builds installed, and the imports run.py needs:" | tee -a "$LOG"
$PIP list 2>/dev/null | grep -i -E "^torch" | tee -a "$LOG"
"$VENV/bin/python" -c "import anomalib.models, anomavision; print('anomalib and anomavision import')" 2>&1 \
  | tail -1 | tee -a "$LOG"
