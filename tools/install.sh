#!/usr/bin/env bash
# Install everything the PQM toolkit needs on a fresh Debian machine, idempotently.
#   Debian packages: sox, flac, TTS voices (flite, festival, espeak-ng) and a text source for the demo corpus.
#   Python: a virtual environment in tools/venv with the pinned stack of tools/requirements.txt
#   and this repository installed in editable mode.
# A second run only checks stamps and takes seconds.
set -euo pipefail
cd "$(dirname "$0")"
tools_dir=$PWD
venv=$tools_dir/venv
python=${PYTHON:-python3}

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*" >&2; }

apt_packages=(sox libsox-fmt-all flac flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
              espeak-ng fortunes-min fortunes)
# Debian's own Pythons make a venv only with ensurepip, in python3.X-venv (a pyenv or conda Python has it)
"$python" -c "import ensurepip" 2>/dev/null ||
  apt_packages+=("$("$python" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')")
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ESPnet imports g2p_en, which on import asks nltk to download two corpora it cannot find: every process
# then goes to the network (a compute node without it waits, and every log gets 8 lines of errors). Nothing
# here uses them: empty archives where nltk looks first for a venv (<sys.prefix>/nltk_data) satisfy it.
nltk_stub() {
  [ -f "$venv/nltk_data/$1" ] && return
  mkdir -p "$(dirname "$venv/nltk_data/$1")"
  printf 'PK\005\006%018d' 0 | tr 0 '\000' > "$venv/nltk_data/$1"  # an empty zip: its end record alone
}

stamp=$venv/.installed
want=$(cat requirements.txt constraints.txt ../setup.py | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  nltk_stub taggers/averaged_perceptron_tagger_eng.zip; nltk_stub corpora/cmudict.zip
  log "tools/venv is up to date"
  exit 0
fi

[ -x "$venv/bin/python" ] || { log "creating $venv"; "$python" -m venv "$venv"; }
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
# pip 26 refuses ESPnet's dependency ci_sdr; openai-whisper 20230124 builds only with setuptools<81,
# and ESPnet declares setuptools<74.
$pip install "pip>=23,<26" "setuptools>=70,<74" wheel
log "installing the Python stack (torch, ESPnet, bitsandbytes, peft, ...)"
# constraints.txt also reaches the isolated build environments of sdists (openai-whisper needs setuptools<81).
PIP_CONSTRAINT=$tools_dir/constraints.txt $pip install -r requirements.txt
$pip install --no-build-isolation --no-deps -e ..
nltk_stub taggers/averaged_perceptron_tagger_eng.zip; nltk_stub corpora/cmudict.zip
echo "$want" > "$stamp"
log "done: . egs/TEMPLATE/path.sh (or a recipe's path.sh) puts tools/venv first on PATH"
