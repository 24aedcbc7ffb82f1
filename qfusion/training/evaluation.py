"""The eval stage: greedy answers scored per budget and question type, beside two training-free baselines.

Every question of every held-out record is asked with the earlier turns as they are in the data, and
the greedy answer of the attached host is scored by exact match and VQA-normalised match. At each
budget (m, n) the same host also answers with N = m (then n) of its *own* vision tokens instead of
the plugin's fused tokens:

* ``avg_pool``: the host's vision tokens of each image / video average-pooled to N;
* ``random``: N of them chosen at random (the same for the same input and seed), in their order.

Both go through exactly the plugin's path (placeholders, positions, the family's hooks): the
baseline stands in for the fusion module for the call. They need the host's vision tokens as its
LLM reads them (the family's default vision source, no HD front-end, the plugin in place of them:
not BLIP's ``augment`` mode) and N no larger than an input's own token count; otherwise they are
left out with the reason. A budget the plugin was not
trained at (per its model card's training record) is flagged and logged.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qfusion.adapters import FUSION_MODULE, get_adapter, unwrap_model
from qfusion.budget import Budget
from qfusion.files import write_atomically, write_json
from qfusion.training.card import read_stages, trained_budgets
from qfusion.training.config import METRICS, TrainConfig
from qfusion.training.data import ConversationDataset, Sample, check_record, load_conversations
from qfusion.training.host import load_host, parse_budgets, process_state, refuse_text_only

logger = logging.getLogger(__name__)

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(r"[^\w\s'.]|_")
DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


def normalize_answer(text: str) -> str:
    """An answer normalised as the VQA evaluation does: lower case; commas inside numbers and periods
    outside decimals dropped; other punctuation marks (but apostrophes) become spaces; number words
    zero..ten (and none) become digits; the articles a, an, the are dropped. (The VQA evaluation's
    table of spelled-out contractions is not applied.)

    >>> normalize_answer("The Two dogs, 1,000 times!")
    '2 dogs 1000 times'
    >>> normalize_answer("3.5 m.")
    '3.5 m'
    """
    text = DIGIT_COMMA.sub("", text.lower().strip())
    text = LONE_PERIOD.sub(" ", PUNCTUATION.sub(" ", text))
    return " ".join(NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES)


def score(predictions: list[str], answers: list[str]) -> dict:
    """Exact match and VQA-normalised match, in percent, of predictions against reference answers."""
    exact = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    vqa = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers))
    count = len(answers)
    return {"exact_match": 100.0 * exact / count, "vqa_match": 100.0 * vqa / count, "count": count}


def scores_by_type(predictions: list[str], items: list["Item"]) -> dict:
    """{"all": scores, "by_type": {type: scores}} (types only when the items have any)."""
    answers = [item.answer for item in items]
    result = {"all": score(predictions, answers), "by_type": {}}
    for kind in sorted({item.type for item in items if item.type is not None}):
        chosen = [i for i, item in enumerate(items) if item.type == kind]
        result["by_type"][kind] = score([predictions[i] for i in chosen], [answers[i] for i in chosen])
    return result


@dataclass(frozen=True)
class Item:
    """One question of the eval data: its record, its number among the record's questions, the
    reference answer and the type."""

    record: int
    question: int
    answer: str
    type: str | None


def eval_items(dataset: ConversationDataset) -> list[Item]:
    """One item per question of every record, in order."""
    items = []
    for index in range(len(dataset)):
        layout = check_record(dataset.records[index], dataset.where(index))
        questions = [turn for turn in layout.turns if turn[0] == "user"]
        answers = [turn[1] for turn in layout.turns if turn[0] == "assistant"]
        items += [Item(index, g, answers[g], questions[g][3]) for g in range(len(questions))]
    return items


def prompt_of(sample: Sample, question: int) -> tuple[list[dict], list, list]:
    """(the conversation up to and including question ``question``, the images and the videos it uses)."""
    conversation = sample.conversation[: 2 * question + 1]
    kinds = [item["type"] for message in conversation if message["role"] == "user" for item in message["content"]]
    return conversation, sample.images[: kinds.count("image")], sample.videos[: kinds.count("video")]


# ---------------------------------------------------------------------------------------------- baselines


class BaselineUnavailable(Exception):
    """A baseline cannot run at a budget (its N exceeds an input's own vision tokens)."""


class TokenBaseline(nn.Module):
    """Stands in for the fusion module: the host's own vision tokens reduced to N training-free.

    kind: "avg_pool" (average-pool each input's tokens to N) or "random" (N of them at random, kept in
    order; seeded by ``seed`` and the input's tokens, so the same input gets the same choice).
    config: the plugin's FusionConfig (the budget rules of the call are the plugin's).
    """

    def __init__(self, kind: str, config, seed: int, device, dtype):
        super().__init__()
        self.kind, self.config, self.seed = kind, config, seed
        self._device, self._dtype = torch.device(device), dtype

    @property
    def device(self) -> torch.device:
        """Where the adapter puts the vision tokens it hands over (the fusion's device)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of those tokens (the fusion's)."""
        return self._dtype

    def reduce(self, tokens: Tensor, count: int) -> Tensor:
        """(count, d) from an input's (V, d) vision tokens."""
        if count > tokens.shape[0]:
            raise BaselineUnavailable(f"N={count} exceeds an input's own {tokens.shape[0]} vision tokens")
        if self.kind == "avg_pool":
            return F.adaptive_avg_pool1d(tokens.T[None].float(), count)[0].T.to(tokens.dtype)
        content = zlib.crc32(tokens.detach().float().cpu().numpy().tobytes())
        generator = torch.Generator().manual_seed(self.seed * 2 ** 32 + content)
        chosen = torch.randperm(tokens.shape[0], generator=generator)[:count].sort().values
        return tokens[chosen.to(tokens.device)]

    def forward(self, vision_tokens, questions, *, budget) -> "BaselineOutput":
        """Per input, per question about it, its N tokens (m for the input's first question, n after)."""
        budget = Budget.of(budget, name="budget")
        return BaselineOutput([[self.reduce(tokens, budget.slots(g)) for g in range(len(group))]
                               for tokens, group in zip(vision_tokens, questions)])


@dataclass
class BaselineOutput:
    """What the adapter reads of a fusion output: ``tokens`` per input, per question."""

    tokens: list[list[Tensor]]


def baseline_reason(adapter) -> str | None:
    """Why the baselines cannot run on this plugin's host features (None: they can)."""
    if adapter.settings.mode == "augment":
        return "in 'augment' mode the host keeps its own vision tokens; N more of them is no comparison"
    if adapter.hd is not None:
        return "the plugin reads HD front-end tokens, not the host's own vision tokens"
    if adapter.source is not adapter.family.sources[0] or adapter.feature_dim != adapter.fusion_output_dim:
        return (f"the plugin reads the host's {adapter.settings.vision_source!r} features, not the vision tokens its "
                f"LLM reads ({adapter.family.sources[0].name!r})")
    return None


@contextlib.contextmanager
def fusion_replaced(model: nn.Module, module: nn.Module):
    """The attached host runs ``module`` where its fusion module stood, for the duration."""
    host = unwrap_model(model)
    original = host._modules[FUSION_MODULE]
    host._modules[FUSION_MODULE] = module
    try:
        yield
    finally:
        host._modules[FUSION_MODULE] = original


# ---------------------------------------------------------------------------------------------- answers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model, processor, dataset: ConversationDataset, items: list[Item], budget: Budget, *, batch_size: int,
            max_new_tokens: int) -> list[str]:
    """Greedy answers to every item at ``budget``: this process's share in left-padded batches,
    gathered from every process in item order."""
    from accelerate.utils import gather_object

    state = process_state()
    mine = list(range(state.process_index, len(items), state.num_processes))
    cache: dict[int, Sample] = {}
    answers: dict[int, str] = {}
    device = _device(model)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start: start + batch_size]
        prompts = {}
        for i in chunk:
            if items[i].record not in cache:
                cache = {items[i].record: dataset[items[i].record]}  # items of one record are adjacent
            prompts[i] = prompt_of(cache[items[i].record], items[i].question)
        visual = [i for i in chunk if prompts[i][1] or prompts[i][2]]
        text = [i for i in chunk if i not in visual]
        for group in (visual, text):
            if not group:
                continue
            conversations = [prompts[i][0] for i in group]
            if group is visual:
                images = [prompts[i][1] for i in group] if any(prompts[i][1] for i in group) else None
                videos = [prompts[i][2] for i in group] if any(prompts[i][2] for i in group) else None
                inputs = processor(images=images, videos=videos, conversations=conversations, budget=budget,
                                   add_generation_prompt=True)
            else:
                refuse_text_only(model, dataset.where(items[group[0]].record))
                inputs = processor.text_inputs(conversations, add_generation_prompt=True)
            inputs = inputs.to(device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            decoded = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.update({i: answer.strip() for i, answer in zip(group, decoded)})
    gathered = gather_object([(i, answers[i]) for i in mine])
    return [answer for _, answer in sorted(gathered)]


# ---------------------------------------------------------------------------------------------- the stage


def score_rows(result: dict) -> list[dict]:
    """The rows of scores.csv: per budget and method, the whole set and each type (series ``method``
    and ``method:type``; the plugin's method is its mode); ``tokens`` is m, the fused tokens of a
    first question."""
    rows = []
    for entry in result["budgets"]:
        for method, scores in entry["scores"].items():
            series = result["mode"] if method == "plugin" else method
            groups = {series: scores["all"], **{f"{series}:{kind}": s for kind, s in scores["by_type"].items()}}
            for name, s in groups.items():
                rows.append({"series": name, "tokens": entry["m"], "m": entry["m"], "n": entry["n"],
                             **{metric: s[metric] for metric in METRICS}, "count": s["count"]})
    return rows


def write_scores_csv(rows: list[dict], path: Path) -> None:
    """scores.csv: the rows :func:`score_rows` builds (what ``qfusion fit`` reads), written atomically."""
    def dump(temporary: Path) -> None:
        with temporary.open("x", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["series", "tokens", "m", "n", *METRICS, "count"])
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, dump)


def format_table(result: dict, metric: str = "vqa_match") -> str:
    """The eval table: one row per budget and method, the score over all questions and per type."""
    kinds = sorted({kind for entry in result["budgets"] for s in entry["scores"].values() for kind in s["by_type"]})
    header = ["m", "n", "method", "all", *kinds]
    rows = []
    for entry in result["budgets"]:
        mark = "" if entry["trained"] in (True, None) else " *"
        for method, s in entry["scores"].items():
            name = f"{result['mode']} plugin" if method == "plugin" else method
            rows.append([str(entry["m"]), f"{entry['n']}{mark}", name, f"{s['all'][metric]:.1f}",
                         *(f"{s['by_type'][k][metric]:.1f}" if k in s["by_type"] else "-" for k in kinds)])
        for method in entry["skipped"]:
            rows.append([str(entry["m"]), f"{entry['n']}{mark}", method, "-", *("-" for _ in kinds)])
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    lines = [f"{metric} (%) on {result['questions']} questions of {result['data']}",
             "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if any(entry["trained"] is False for entry in result["budgets"]):
        lines.append("* a budget the plugin was not trained at")
    for entry in result["budgets"]:
        for method, reason in entry["skipped"].items():
            lines.append(f"{method} at m={entry['m']}: not run ({reason})")
    return "\n".join(lines)


def evaluate(config: TrainConfig, *, host=None, host_processor=None, mode: str | None = None,
             baselines: list[str] | None = None) -> dict:
    """Score ``config.plugin`` on ``eval.data`` at every budget of ``eval.budgets``, with the baselines of
    ``eval.baselines`` (or ``baselines``); writes ``eval.json`` (scores, every prediction, the table)
    and ``scores.csv`` into ``config.output_dir`` and returns eval.json's content.

    host / host_processor: as :func:`qfusion.training.train`. mode: the plugin's series name
    (default from its use_question).
    """
    if not config.plugin:
        raise ValueError("plugin: the eval stage needs a saved plugin directory to evaluate")
    loaded = load_host(config, host, host_processor)
    model = loaded.model.to(process_state().device).eval()
    adapter = get_adapter(model)
    fusion = adapter.fusion.config
    mode = mode or ("question" if fusion.use_question else "no_question")
    budgets = ([adapter.budget] if config.eval.budgets is None
               else parse_budgets(config.eval.budgets, "eval.budgets", fusion.codebook_size, fusion.n))
    stages = read_stages(config.plugin)
    trained = trained_budgets(stages) if stages is not None else None
    methods = config.eval.baselines if baselines is None else baselines
    unavailable = baseline_reason(adapter) if methods else None
    dataset = load_conversations(config.eval.data, image_root=config.data.image_root, split=config.data.split,
                                 num_frames=config.data.num_frames, name="eval.data")
    items = eval_items(dataset)
    result = {"plugin": config.plugin, "data": config.eval.data, "mode": mode, "questions": len(items),
              "trained_budgets": None if trained is None else sorted(list(b) for b in trained),
              "budgets": [], "predictions": {}}
    settings = dict(batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens)
    for budget in budgets:
        is_trained = None if trained is None else budget in trained
        if is_trained is False:
            logger.warning("eval: the plugin was not trained at budget (m=%d, n=%d) (trained: %s); its scores there "
                           "are an extrapolation", budget.m, budget.n, sorted(list(b) for b in trained))
        entry = {"m": budget.m, "n": budget.n, "trained": is_trained, "scores": {}, "skipped": {}}
        predictions = {"plugin": predict(model, loaded.processor, dataset, items, budget, **settings)}
        for method in methods:
            if unavailable is not None:
                entry["skipped"][method] = unavailable
                continue
            baseline = TokenBaseline(method, fusion, config.seed, adapter.fusion.device, adapter.fusion.dtype)
            try:
                with fusion_replaced(model, baseline):
                    predictions[method] = predict(model, loaded.processor, dataset, items, budget, **settings)
            except BaselineUnavailable as error:
                entry["skipped"][method] = str(error)
        entry["scores"] = {method: scores_by_type(answers, items) for method, answers in predictions.items()}
        result["budgets"].append(entry)
        result["predictions"][f"m{budget.m}-n{budget.n}"] = predictions
    if stages is None:
        logger.warning("eval: %s holds no training record (model card); cannot say which budgets it was trained at",
                       config.plugin)
    result["table"] = format_table(result)
    if process_state().is_main_process:
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(result, out / "eval.json")
        write_scores_csv(score_rows(result), out / "scores.csv")
    process_state().wait_for_everyone()
    return result
