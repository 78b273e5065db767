"""The paper's table for a user's speakers: RESULTS.md, results.json and a WER-vs-N plot.

Every number is recomputed from the hypothesis files (``decode/<system>/hyp/*.txt``) and the
references, so the table always says how it was made: model, quantisation, adapter init, N,
decoding settings.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from safetensors.torch import load_file

from pqm_ext.asr.decode import decode_inputs
from pqm_ext.asr.layout import INIT_SYSTEM, ExpLayout, System
from pqm_ext.asr.score import UttScore, paired_bootstrap, score_utterances, summarize
from pqm_ext.data.kaldi_dir import DataDir
from pqm_ext.lora.batchnorm import PREFIX as BATCHNORM_PREFIX
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import write_text_atomic
from pqm_ext.lora.io import WEIGHTS, adapter_info
from pqm_ext.utils.provenance import canonical, changes, file_digest

logger = logging.getLogger(__name__)


def read_hyps(decode_dir: Path, speakers: Sequence[str]) -> Optional[Dict[str, str]]:
    hyps = {}
    for spk in speakers:
        f = decode_dir / "hyp" / f"{spk}.txt"
        if not f.is_file():
            return None
        for line in f.read_text(encoding="utf-8").splitlines():
            utt, _, text = line.partition(" ")
            hyps[utt] = text
    return hyps


def decode_record(decode_dir: Path, spk: str) -> Optional[Dict]:
    """Stage 8's record of how ``spk``'s hypotheses were made (None if there is none).

    Unlike ``provenance.read_record``, which lets stage 8 redo a unit whose record is unreadable, a table
    must not vouch for hypotheses whose record it cannot read: a corrupt file is an error naming it.
    """
    f = decode_dir / "hyp" / f"{spk}.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f, f"not a readable decoding record ({e}): run stage 8 again to redo it") from None


def check_decoded_with(decode_dir: Path, speakers: Sequence[str], decode_conf: Dict) -> None:
    """Refuse to put hypotheses into a table that names decoding settings they were not made with."""
    for spk in speakers:
        used = (decode_record(decode_dir, spk) or {}).get("decode_conf")
        if used is not None and canonical(used) != canonical(decode_conf):
            raise InputError(decode_dir / "hyp" / f"{spk}.json",
                             "decoded with other settings than the table's --decode_config ("
                             + "; ".join(changes(used, decode_conf)) + "): run stage 8's decoding with it first")


def check_decoded_from(system: System, decode_dir: Path, data: DataDir, hyps: Dict[str, str]) -> None:
    """Refuse hypotheses that are not of this test set, model and adapters: stage 8 decoded another data dir,
    or stage 5 or 7 has replaced a model since. Every test utterance must have a hypothesis; a missing one
    would be scored as all deletions."""
    absent = [u for u in data.text if u not in hyps]
    if absent:
        spk = data.utt2spk[absent[0]]
        raise InputError(decode_dir / "hyp" / f"{spk}.txt", f"no hypothesis for {absent[0]} ({len(absent)} test "
                         "utterance(s) missing): run stage 8's decoding for this test set")
    spk2utt = data.spk2utt()
    made = {spk: (decode_record(decode_dir, spk) or {}).get("made_from") for spk in sorted(spk2utt)}
    unrecorded = [spk for spk, m in made.items() if m is None]
    if unrecorded and len(unrecorded) < len(made):  # all unrecorded: written before records named their inputs
        raise InputError(decode_dir / "hyp" / f"{unrecorded[0]}.json", "missing beside the other speakers' records "
                         "(a decoding stopped while it replaced these hypotheses): run stage 8's decoding again")
    for spk, made_from in made.items():
        if made_from is None:
            continue
        try:
            now = decode_inputs(system, spk, data, spk2utt[spk], made_from.get("decode_conf"))
        except FileNotFoundError as e:
            raise InputError(e.filename, f"gone, but {spk}'s hypotheses by {system.name} were made with it") from None
        stale = [what for key, what in (("test_utts", "test utterances"), ("model", "model"), ("adapter", "adapter"))
                 if made_from.get(key) != now[key]]
        if stale:
            raise InputError(decode_dir / "hyp" / f"{spk}.json", f"decoded before its {', '.join(stale)} changed: "
                             "run stage 8's decoding again")


def decode_timing(decode_dir: Path, speakers: Sequence[str]) -> Dict:
    audio = dec = 0.0
    for spk in speakers:
        d = decode_record(decode_dir, spk)
        if d is not None:
            audio, dec = audio + d["audio_s"], dec + d["decode_s"]
    return {"audio_s": round(audio, 2), "decode_s": round(dec, 2), "rtf": round(dec / audio, 4) if audio else None}


def adapter_params(adapter_dir: Path) -> int:
    """The adapter's LoRA weights (BatchNorm statistics saved with it are buffers, as in the base's count)."""
    return sum(t.numel() for k, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
               if not k.startswith(BATCHNORM_PREFIX))


Key = Tuple[str, Optional[int]]  # (results.json group, N adaptation utterances or None)


def _label(key: Key) -> str:
    return key[0] if key[1] is None else f"{key[0]}@{key[1]}"


def comparisons(keys: Sequence[Key], quant: str) -> List[Tuple[Key, Key]]:
    """(system, baseline) pairs the paper's claims rest on: the quantised base against full precision,
    PQM against LoRA from scratch, and PQM on pseudo-labels against PQM, at every N both have."""
    have = set(keys)
    pairs = [((quant, None), ("fp", None))]
    for system, baseline in (("pqm", "lora_scratch"), ("pqm_semi", "pqm")):
        pairs += [((system, n), (baseline, n)) for n in sorted(n for g, n in have if g == system and n is not None)]
    return [(a, b) for a, b in pairs if a in have and b in have]


def _nest(values: Dict[Key, object]) -> Dict:
    """{(group, n): v} -> {group: v} or {group: {str(n): v}}, the shape of results.json's "systems"."""
    out: Dict = {}
    for (group, n), v in values.items():
        if n is None:
            out[group] = v
        else:
            out.setdefault(group, {})[str(n)] = v
    return out


def pqm_started_from(layout: ExpLayout) -> List[str]:
    """The pretrained LoRAs the layout's PQM adapters were trained from, as their adapters' records name them
    (not as the layout would pick now: stage 6 may have run with the tag after stage 7)."""
    known = {file_digest(d / WEIGHTS): str(d) for d in (layout.root / "lora_pretrain" / "adapter",
                                                         layout.work / "lora_pretrain" / "adapter")
             if (d / WEIGHTS).is_file()}
    used = {adapter_info(a).get("made_from", {}).get("init_adapter")
            for init in ("pretrained", "semi") for a in layout.adapters(init)}
    return sorted(known.get(d, "an adapter no longer on disk") for d in used if d)


def collect(layout: ExpLayout, systems: List[System], data: DataDir, model: str, corpus: str,
            decode_conf: Dict, cleaner: str = "none") -> Dict:
    speakers = sorted(set(data.utt2spk.values()))
    results: Dict = {"model": model, "corpus": corpus, "quant": layout.quant, "speakers": speakers,
                     "test_utts": len(data.utt2spk), "decode": decode_conf, "score_cleaner": cleaner,
                     "systems": {}, "decode_time": {}}
    if layout.tag:  # a variant's table must say so, and which pretrained LoRA its PQM started from
        results["tag"] = layout.tag
        results["pqm_started_from"] = pqm_started_from(layout)
    scored: Dict[Key, List[UttScore]] = {}
    summaries: Dict[Key, Dict] = {}
    for system in systems:
        hyps = read_hyps(layout.decode(system.name), speakers)
        if hyps is None:
            logger.warning("%s: not decoded for every speaker, left out", system.name)
            continue
        check_decoded_with(layout.decode(system.name), speakers, decode_conf)
        check_decoded_from(system, layout.decode(system.name), data, hyps)
        key = (system.group, system.n_utts)
        scored[key] = score_utterances(data.text, hyps, cleaner)
        summaries[key] = summarize(scored[key], data.utt2spk)
        write_text_atomic(layout.decode(system.name) / "score.json",
                          json.dumps({**summaries[key], "score_cleaner": cleaner}, indent=1))
        results["decode_time"][system.name] = decode_timing(layout.decode(system.name), speakers)
    results["systems"] = _nest(summaries)
    fp = scored.get(("fp", None))
    if fp and results["systems"]["fp"]["wer"] > 0:
        vs_fp = {key: paired_bootstrap(fp, scores) for key, scores in scored.items() if key[0] != "fp"}
        results["relative_wer_reduction_vs_fp"] = _nest({k: v["rel_reduction"] for k, v in vs_fp.items()})
        results["relative_wer_reduction_vs_fp_ci95"] = _nest({k: v["rel_reduction_ci95"] for k, v in vs_fp.items()})
    results["paired_comparisons"] = [
        {"system": _label(a), "baseline": _label(b), **paired_bootstrap(scored[b], scored[a])}
        for a, b in comparisons(list(scored), layout.quant)]
    sizes = {}
    for label in ["base"] + [s.group for s in systems if s.n_utts is None and s.group not in ("fp", "lora_pretrained")]:
        report = (layout.base if label == "base" else layout.quantized(label)) / "size_report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            sizes["fp32" if label == "base" else label] = r["bytes"]
            results.setdefault("base_params", r["total_params"])
    results["bytes"] = sizes
    params = {}
    for init, group in INIT_SYSTEM.items():
        found = layout.adapters(init)
        if found:
            params[group] = adapter_params(found[0])
    if (layout.pretrain / "adapter").is_dir():
        params["lora_pretrained"] = adapter_params(layout.pretrain / "adapter")
    results["adapter_params_by_system"] = params
    results["adapter_params"] = max(params.values()) if params else 0
    return results


NORMALISATION = {
    "none": "accents folded, lower case, dashes and slashes split words, other punctuation removed "
            "(pqm_ext.asr.score)",
    "whisper_en": "Whisper's English normaliser on references and hypotheses (ESPnet's whisper_en cleaner: "
                  "numbers, titles, contractions and spellings in one form, annotations removed)",
    "whisper_basic": "Whisper's basic normaliser on references and hypotheses (ESPnet's whisper_basic cleaner)",
}


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def render_markdown(r: Dict) -> str:
    mb = 1e6
    lines = [f"# Results: {r['model']} on {r['corpus']}" + (f", variant `{r['tag']}`" if r.get("tag") else ""), ""]
    if r.get("tag"):
        origin, start = r.get("pqm_started_from") or [], ""
        if len(origin) == 1:
            start = f"; PQM started from `{origin[0]}`"
        elif origin:
            start = "; PQM's adapters started from different pretrained LoRAs (re-run stage 7): " + ", ".join(
                f"`{o}`" for o in origin)
        lines += [f"A variant beside the default table (`--tag {r['tag']}`): the same base and quantised "
                  f"models{start}.", ""]
    lines += [f"Target speakers: {len(r['speakers'])}, test utterances: {r['test_utts']}. "
              f"WER pooled over all test words (errors / reference words), 95% bootstrap interval over utterances. "
              f"Decoding: {json.dumps(r['decode'])}. Normalisation: {NORMALISATION[r.get('score_cleaner', 'none')]}.",
              "The relative reduction's interval is paired: FP and the system are resampled with the same utterances.",
              "", "| system | N adapt utts | WER % | 95% CI | sub/del/ins | rel. WER reduction vs FP % "
              "| paired 95% CI | base size MB |", "|---|---|---|---|---|---|---|---|"]
    sizes = r.get("bytes", {})
    rel, rel_ci = r.get("relative_wer_reduction_vs_fp", {}), r.get("relative_wer_reduction_vs_fp_ci95", {})

    def at(d: Dict, name: str, n: Optional[str]):
        v = d.get(name)
        return v.get(n) if isinstance(v, dict) else v

    for name, entry in r["systems"].items():
        rows = [(None, entry)] if "wer" in entry else sorted(entry.items(), key=lambda kv: int(kv[0]))
        for n, e in rows:
            rr, ci = at(rel, name, n), at(rel_ci, name, n)
            size = sizes.get("fp32" if name == "fp" else (name if name in sizes else r.get("quant")))
            lines.append(f"| {name} | {n or '-'} | {_pct(e['wer'])} | {_pct(e['ci95'][0])}-{_pct(e['ci95'][1])} | "
                         f"{e['sub']}/{e['del']}/{e['ins']} | {_pct(rr)} | "
                         f"{'' if ci is None else f'{_pct(ci[0])} to {_pct(ci[1])}'} | "
                         f"{'' if size is None else f'{size / mb:.1f}'} |")
    lines += ["", f"Base parameters: {r.get('base_params')}; adapter parameters per speaker: "
              f"{json.dumps(r.get('adapter_params_by_system', {}))}"]
    if r.get("base_params") and r.get("adapter_params"):
        lines.append(f"Largest adapter = {100 * r['adapter_params'] / r['base_params']:.2f}% of the base parameters.")
    if "fp32" in sizes and r.get("quant") in sizes:
        lines.append(f"Model size: fp32 {sizes['fp32'] / mb:.1f} MB -> {r['quant']} {sizes[r['quant']] / mb:.1f} MB "
                     f"({sizes['fp32'] / sizes[r['quant']]:.2f}x smaller; parameters: buffers such as Whisper's sinusoidal "
                     "positions or BatchNorm statistics are not counted on either side, the checkpoint file holds "
                     "them too).")
    if r.get("paired_comparisons"):
        lines += ["", "## Paired comparisons", "",
                  "Same test utterances, resampled together (1000 draws). Difference = system - baseline; "
                  "\"better in\" = share of resamples where the system makes fewer errors.", "",
                  "| system | baseline | WER difference, points | 95% CI | rel. WER reduction % | better in % |",
                  "|---|---|---|---|---|---|"]
        for c in r["paired_comparisons"]:
            lines.append(f"| {c['system']} | {c['baseline']} | {100 * c['wer_diff']:+.1f} | "
                         f"{100 * c['wer_diff_ci95'][0]:+.1f} to {100 * c['wer_diff_ci95'][1]:+.1f} | "
                         f"{_pct(c['rel_reduction'])} | {100 * c['p_better']:.0f} |")
    lines += ["", "## Per speaker WER %", ""]
    cols = [(name, n) for name, entry in r["systems"].items()
            for n in ([None] if "wer" in entry else sorted(entry, key=int))]
    lines.append("| speaker | " + " | ".join(f"{c}{'' if n is None else '@' + n}" for c, n in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for spk in r["speakers"]:
        vals = []
        for name, n in cols:
            e = r["systems"][name] if n is None else r["systems"][name][n]
            vals.append(_pct(e["per_speaker"].get(spk, {}).get("wer")))
        lines.append(f"| {spk} | " + " | ".join(vals) + " |")
    lines += ["", "## Decoding time", "", "| system | audio s | decode s | RTF |", "|---|---|---|---|"]
    for name, t in r.get("decode_time", {}).items():
        lines.append(f"| {name} | {t['audio_s']} | {t['decode_s']} | {t['rtf']} |")
    return "\n".join(lines) + "\n"


def plot_wer_vs_n(r: Dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for name, entry in r["systems"].items():
        if "wer" in entry:
            ax.axhline(100 * entry["wer"], linestyle="--", linewidth=1, label=name,
                       color={"fp": "black", "nf4": "tab:red"}.get(name))
        else:
            ns = sorted(entry, key=int)
            ax.plot([int(n) for n in ns], [100 * entry[n]["wer"] for n in ns], marker="o", label=name)
            drawn = True
    ax.set_xlabel("adaptation utterances per speaker (N)")
    ax.set_ylabel("WER %")
    ax.set_title(f"{r['model']} on {r['corpus']}" + (f" ({r['tag']})" if r.get("tag") else "") + ": WER vs N")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return drawn
