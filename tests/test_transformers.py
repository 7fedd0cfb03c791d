"""``functional_ema.transformers.EMACallback`` in a real Hugging Face ``Trainer``, on the CPU.

A one-layer BERT classifier (built from a config, nothing downloaded) trained for a few steps on
random token ids, seeded. A probe callback placed before ``EMACallback`` records the live
weights after each optimizer step, what each evaluation forward ran on (a hook inside the
model) and, at each evaluation, the loss of ``ema.shadow`` on the evaluation set. Every check is
exact (``torch.equal``, ``==``).
"""

from __future__ import annotations

import copy
import os
import pickle
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import functional_ema as fe
from functional_ema.transformers import CHECKPOINT_FILE, EMACallback


VOCAB = 16
LENGTH = 6
DECAY = 0.9
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer_ema.py"


def make_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config).train()


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    labels = (ids[:, 0] < VOCAB // 2).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


TRAIN = make_data(24, seed=1)
EVAL = make_data(8, seed=2)  # one evaluation batch: eval_loss is that batch's loss exactly
EVAL_B = make_data(8, seed=3)


def make_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2,  # large: the averages and the weights differ visibly
        "max_steps": 6,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        elif isinstance(a[name], dict):
            assert_same(a[name], b[name])
        else:
            assert a[name] == b[name], name


def holds_averages(model: torch.nn.Module, ema: fe.EMA) -> bool:
    return all(torch.equal(p, ema.average(name)) for name, p in model.named_parameters())


def batch_loss(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    batch = {key: torch.stack([row[key] for row in data]) for key in data[0]}
    with torch.no_grad():
        return float(model(**batch).loss)


class Probe(TrainerCallback):
    """Placed before EMACallback: sees each event before it does."""

    def __init__(self, callback: EMACallback, eval_sets: dict[str, list[Any]]) -> None:
        self.callback = callback
        self.eval_sets = eval_sets
        self.weights: list[dict[str, torch.Tensor]] = []  # live, after each optimizer step
        self.substeps = 0
        self.evaluations: list[tuple[str, float, bool]] = []  # (set, eval loss, on averages)
        self.forwards: list[bool] = []  # per evaluation forward: the model held the averages
        self.shadow_losses: list[float] = []  # ema.shadow's loss on the same set (ShadowLoss)
        self.live_losses: list[float] = []  # the live weights' on the same set
        self.scratch = make_model().eval()  # holds copies of the live weights
        self.live_checks = 0

    def _check_live(self, model: torch.nn.Module) -> None:
        if self.weights:
            assert_same(snapshot(model), self.weights[-1])
            self.live_checks += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, args, output):  # inside the model's forward, before it returns
            if module is model.classifier and not module.training:  # not in ema.shadow
                self.forwards.append(holds_averages(model, self.callback.ema))

        model.classifier.register_forward_hook(record)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._check_live(model)

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(snapshot(model))

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        # Every forward of the evaluation ran on the averages; between forwards (now, with
        # the metrics) the model holds its live weights.
        self._check_live(model)
        forwards, self.forwards = self.forwards, []
        [name] = [n for n in self.eval_sets if f"{n}_loss" in metrics]
        if self.weights:  # the live weights' loss, on a scratch copy
            self.scratch.load_state_dict(self.weights[-1])
        self.live_losses.append(batch_loss(self.scratch, self.eval_sets[name]))
        self.evaluations.append((name, metrics[f"{name}_loss"], bool(forwards) and all(forwards)))

    def on_save(self, args, state, control, model=None, **kwargs):
        self._check_live(model)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        written = load_file(folder / "model.safetensors")  # the live weights, not the averages
        assert_same(written, {name: self.weights[-1][name] for name in written})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.callback.apply_at_end:
            self._check_live(model)


class ShadowLoss(TrainerCallback):
    """Placed after EMACallback: ema.shadow is first built (a copy of the model's structure)
    once the live weights are back. It never runs the live model."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def on_evaluate(self, args, state, control, **kwargs):
        data = self.probe.eval_sets[self.probe.evaluations[-1][0]]
        self.probe.shadow_losses.append(batch_loss(self.probe.callback.ema.shadow, data))


def train(
    tmp: Path,
    callback: EMACallback | None,
    *,
    eval_dataset: Any = None,
    resume: str | bool | None = None,
    **overrides: Any,
) -> tuple[Trainer, Probe | None, torch.nn.Module]:
    """Train a fresh model (with a probe before the callback); return what the test checks."""
    model = make_model()
    initial = copy.deepcopy(model)
    probe = None
    callbacks: list[TrainerCallback] = []
    if callback is not None:
        named = {"eval": eval_dataset} if isinstance(eval_dataset, list) else {}
        if isinstance(eval_dataset, dict):
            named = {f"eval_{name}": data for name, data in eval_dataset.items()}
        probe = Probe(callback, named)
        callbacks = [probe, callback, ShadowLoss(probe)]
    trainer = Trainer(
        model=model,
        args=make_args(tmp, **overrides),
        train_dataset=TRAIN,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, probe, initial


def by_hand(initial: torch.nn.Module, weights: list[dict[str, torch.Tensor]], **options: Any):
    """An fe.EMA driven over the recorded weights, one update per optimizer step."""
    model = copy.deepcopy(initial).train()
    ema = fe.EMA(model, DECAY, **options)
    for values in weights:
        model.load_state_dict(values)
        ema.update()
    return ema


@pytest.mark.parametrize(
    ("accumulation", "options"),
    [(1, {}), (3, {"use_num_updates": True})],
    ids=["one-batch-per-step", "accumulate-3"],
)
def test_averages_equal_an_ema_driven_by_hand(
    tmp_path: Path, accumulation: int, options: dict[str, Any]
) -> None:
    callback = EMACallback(DECAY, **options)
    trainer, probe, initial = train(
        tmp_path,
        callback,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=5,  # with accumulation 3: 4 steps per epoch, so an epoch boundary too
    )
    assert probe is not None
    steps = trainer.state.global_step
    assert steps == 5 == len(probe.weights) == int(callback.ema.step)
    assert probe.substeps == steps * (accumulation - 1)  # micro-batches that are not steps

    hand = by_hand(initial, probe.weights, **options)
    assert_same(callback.ema.state_dict(), hand.state_dict())
    gap = max(
        float((p.detach() - callback.ema.average(n)).abs().max())
        for n, p in trainer.model.named_parameters()
    )
    assert gap > 0  # the averages are not the weights
    print(
        f"accumulation={accumulation}: {steps} optimizer steps, {probe.substeps} other "
        f"micro-batches, {int(callback.ema.step)} updates; averages == by hand; "
        f"max |weight - average| = {gap:.3g}"
    )


@pytest.mark.parametrize("datasets", ["one", "two"])
def test_evaluation_runs_on_the_averages_and_gives_the_live_weights_back(
    tmp_path: Path, datasets: str
) -> None:
    eval_dataset: Any = EVAL if datasets == "one" else {"a": EVAL, "b": EVAL_B}
    callback = EMACallback(DECAY)
    settings = {
        "eval_strategy": "steps",
        "eval_steps": 2,
        "eval_on_start": True,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    trainer, probe, _ = train(tmp_path / "ema", callback, eval_dataset=eval_dataset, **settings)
    assert probe is not None
    # eval_on_start, then steps 2, 4, 6: once per dataset each time
    assert len(probe.evaluations) == 4 * len(probe.eval_sets)
    for (name, metric, on_averages), shadow in zip(
        probe.evaluations, probe.shadow_losses, strict=True
    ):
        assert metric == shadow, name
        assert on_averages, name
    start = len(probe.eval_sets)  # eval_on_start: the averages are still the weights
    assert probe.live_losses[:start] == probe.shadow_losses[:start]
    for live, shadow in zip(probe.live_losses[start:], probe.shadow_losses[start:], strict=True):
        assert live != shadow
    assert probe.live_checks >= 6 + 2 + 3 * len(probe.eval_sets)  # step begins, saves, evals

    # The callback does not change training: same weights as a run without it.
    plain, _, _ = train(tmp_path / "plain", None, eval_dataset=eval_dataset, **settings)
    assert_same(snapshot(trainer.model), snapshot(plain.model))
    rows = zip(probe.evaluations, probe.live_losses, strict=True)
    print("eval loss of the averages (== ema.shadow's) / of the live weights:")
    print([(name, f"{metric:.6f}", f"{live:.6f}") for (name, metric, _), live in rows])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EMACallback, Trainer]:
    """An uninterrupted run of 6 steps that saves checkpoint-3 and checkpoint-6."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    callback = EMACallback(DECAY, use_num_updates=True)
    trainer, _, _ = train(folder, callback, save_strategy="steps", save_steps=3)
    return folder, callback, trainer


def test_averages_file_beside_each_checkpoint_loads_weights_only(saved_run) -> None:
    folder, callback, _ = saved_run
    for step in (3, 6):
        path = folder / f"checkpoint-{step}" / CHECKPOINT_FILE
        saved = torch.load(path, weights_only=True)
        assert saved["global_step"] == step
        assert saved["format"] == 1
        fresh = fe.EMA(make_model(), DECAY)
        fresh.load_state_dict(saved["ema"])
        assert int(fresh.step) == step
        assert repr(fresh.decay) == "tf_warmup(decay=0.9)"  # the settings come back too
    assert_same(saved["ema"], callback.ema.state_dict())
    print(sorted(os.listdir(folder / "checkpoint-3")))


@pytest.mark.parametrize("how", ["path", "latest"])
def test_resume_gives_the_averages_of_an_uninterrupted_run(
    saved_run, tmp_path: Path, how: str
) -> None:
    folder, uninterrupted, reference = saved_run
    # The run "killed" after step 3: its checkpoint-3, in a fresh output folder.
    shutil.copytree(folder / "checkpoint-3", tmp_path / "checkpoint-3")
    resume: str | bool = str(tmp_path / "checkpoint-3") if how == "path" else True
    callback = EMACallback(DECAY, use_num_updates=True)
    trainer, _, _ = train(tmp_path, callback, resume=resume, save_strategy="steps", save_steps=3)
    assert trainer.state.global_step == 6
    assert_same(snapshot(trainer.model), snapshot(reference.model))  # the Trainer's part
    assert_same(callback.ema.state_dict(), uninterrupted.ema.state_dict())
    assert_same(
        torch.load(tmp_path / "checkpoint-6" / CHECKPOINT_FILE, weights_only=True),
        torch.load(folder / "checkpoint-6" / CHECKPOINT_FILE, weights_only=True),
    )
    print(f"resumed ({how}) at step 3: final averages and checkpoint-6/ema.pt bit-identical")


def test_resume_without_the_averages_file_is_an_error(saved_run, tmp_path: Path) -> None:
    folder, _, _ = saved_run
    shutil.copytree(folder / "checkpoint-3", tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-3" / CHECKPOINT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no averages beside the checkpoint") as error:
        train(tmp_path, EMACallback(DECAY), resume=True)
    print(error.value)


def test_resume_from_a_folder_elsewhere(saved_run, tmp_path: Path) -> None:
    folder, uninterrupted, _ = saved_run
    shutil.copytree(folder / "checkpoint-3", tmp_path / "elsewhere" / "checkpoint-3")
    callback = EMACallback(DECAY, use_num_updates=True)
    callback.resume_from = tmp_path / "elsewhere" / "checkpoint-3"
    train(tmp_path / "out", callback, resume=str(callback.resume_from))
    assert_same(callback.ema.state_dict(), uninterrupted.ema.state_dict())


def test_apply_at_end_copies_the_averages_into_the_model(tmp_path: Path) -> None:
    callback = EMACallback(DECAY, apply_at_end=True)
    trainer, probe, _ = train(tmp_path, callback, max_steps=4)
    assert probe is not None
    ema = callback.ema
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, ema.average(name)), name
    assert not torch.equal(trainer.model.classifier.weight, probe.weights[-1]["classifier.weight"])
    trainer.save_model(str(tmp_path / "final"))  # not refused: no averages stored
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert torch.equal(saved["classifier.weight"], ema.average("classifier.weight"))
    print(f"apply_at_end: model == averages after {int(ema.step)} steps; save_model wrote them")


def test_load_best_model_at_end_loads_that_checkpoints_averages(tmp_path: Path) -> None:
    callback = EMACallback(DECAY, apply_at_end=True)
    trainer, _, _ = train(
        tmp_path,
        callback,
        eval_dataset=EVAL,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst loss: an early checkpoint, not the last one
    )
    best = trainer.state.best_model_checkpoint
    assert best is not None
    assert int(callback.ema.step) == trainer.state.best_global_step < trainer.state.global_step
    saved = torch.load(Path(best) / CHECKPOINT_FILE, weights_only=True)
    assert_same(callback.ema.state_dict(), saved["ema"])
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, callback.ema.average(name)), name
    print(f"best checkpoint {Path(best).name}: its averages loaded and applied")


@pytest.mark.parametrize("where", ["metrics", "forward", "interrupt"])
def test_a_failed_evaluation_leaves_the_live_weights_in_the_model(tmp_path: Path, where: str):
    # The second evaluation (step 4) fails: in compute_metrics, inside the model's forward
    # (an Exception), or by a KeyboardInterrupt inside the forward.
    evaluations: list[int] = []
    failed: list[int] = []

    def metrics(_: Any) -> dict[str, float]:
        evaluations.append(1)
        if where == "metrics" and len(evaluations) == 2:
            raise ArithmeticError("metric failed")
        return {}

    def fail(module: torch.nn.Module, args: Any, output: Any) -> None:
        if where != "metrics" and not module.training and len(evaluations) == 1 and not failed:
            failed.append(1)
            raise (KeyboardInterrupt if where == "interrupt" else ArithmeticError)("failed")

    model = make_model()
    model.classifier.register_forward_hook(fail)
    callback = EMACallback(DECAY)
    probe = Probe(callback, {"eval": EVAL})
    settings = {"eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps"}
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=4, save_steps=2, **settings),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        compute_metrics=metrics,
        callbacks=[probe, callback],
    )
    with pytest.raises(KeyboardInterrupt if where == "interrupt" else ArithmeticError):
        trainer.train()
    if where == "interrupt":  # torch runs always_call hooks for an Exception only
        with pytest.raises(RuntimeError, match=r"model.state_dict\(\) between ema.store"):
            snapshot(model)
        callback.ema.restore()  # the fix the refusal names (a plain train() would do it too)
    assert_same(snapshot(model), probe.weights[-1])  # the live weights of step 4
    trainer.save_model(str(tmp_path / "final"))
    # Resuming loads checkpoint-2 into the model before the callback's on_train_begin.
    del probe.weights[2:]  # the probe checks the live weights from step 2 on again
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == int(callback.ema.step) == 4
    assert [on_averages for _, _, on_averages in probe.evaluations] == [True, True]  # 2, 4
    print(f"{where}: live weights in the model after the failure; resumed from checkpoint-2")


def test_a_failed_resume_keeps_the_previous_averages(saved_run, tmp_path: Path) -> None:
    folder, _, _ = saved_run
    callback = EMACallback(DECAY)
    train(tmp_path / "first", callback, max_steps=2)
    ema, before = callback.ema, copy.deepcopy(callback.ema.state_dict())
    shutil.copytree(folder / "checkpoint-3", tmp_path / "second" / "checkpoint-3")
    (tmp_path / "second" / "checkpoint-3" / CHECKPOINT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no averages beside the checkpoint"):
        train(tmp_path / "second", callback, resume=True)
    assert callback.ema is ema
    assert_same(callback.ema.state_dict(), before)
    assert int(callback.ema.step) == 2


def test_a_copy_of_the_model_made_while_armed_runs_its_own_weights(tmp_path: Path) -> None:
    # Between two evaluation datasets the hooks stay armed: a copy of the model made there
    # (e.g. ema.shadow built in a later callback's on_evaluate) must not carry them along.
    copies: list[tuple[str, float, float]] = []  # (how, the copy's loss, the live weights')

    class Copy(TrainerCallback):  # after EMACallback
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            if "eval_a_loss" not in metrics:
                return
            assert callback._hooks  # armed for dataset "b"
            live = snapshot(model)
            scratch = make_model().eval()
            scratch.load_state_dict(live)
            for how, copy_of in [("deepcopy", copy.deepcopy), ("pickle", pickle_copy)]:
                twin = copy_of(model).eval()
                copies.append((how, batch_loss(twin, EVAL), batch_loss(scratch, EVAL)))
                assert_same(snapshot(twin), live)  # its state_dict() is not refused
            assert_same(snapshot(model), live)  # the copies' forwards left the model alone

    def pickle_copy(model: torch.nn.Module) -> torch.nn.Module:
        return pickle.loads(pickle.dumps(model))

    callback = EMACallback(DECAY)
    trainer = Trainer(
        model=make_model(),
        args=make_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
        train_dataset=TRAIN,
        eval_dataset={"a": EVAL, "b": EVAL_B},
        callbacks=[callback, Copy()],
    )
    trainer.train()
    assert [how for how, *_ in copies] == ["deepcopy", "pickle"]
    for how, twin, live in copies:
        assert twin == live, how
    print(copies)


def recorder(
    model: torch.nn.Module, callback: EMACallback, names: list[str]
) -> list[tuple[str, bool]]:
    """Per eval-mode call of these submodules: whether the model held the averages."""
    calls: list[tuple[str, bool]] = []
    for name in names:
        submodule = model.get_submodule(name)

        def record(module, args, output, name=name, submodule=submodule):
            if module is submodule and not module.training:  # not in ema.shadow
                calls.append((name, holds_averages(model, callback.ema)))

        submodule.register_forward_hook(record)
    return calls


def test_generation_evaluates_the_averages(tmp_path: Path) -> None:
    # generate() calls the encoder on its own, then the whole model once per new token.
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config)
    data = [{"input_ids": row["input_ids"], "labels": row["input_ids"][:4]} for row in TRAIN]
    callback = EMACallback(DECAY)
    calls = recorder(model, callback, ["encoder.final_layer_norm", "lm_head"])
    settings = make_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2).to_dict()
    settings.pop("output_dir")
    trainer = Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(
            str(tmp_path), predict_with_generate=True, generation_max_length=4, **settings
        ),
        train_dataset=data,
        eval_dataset=data[:8],
        compute_metrics=lambda _: {},
        callbacks=[callback],
    )
    trainer.train()
    [evaluation] = [row for row in trainer.state.log_history if "eval_loss" in row]
    # generate: the encoder, then 3 new tokens; then the loss: encoder and decoder once more
    names = ["encoder.final_layer_norm", *["lm_head"] * 3, "encoder.final_layer_norm", "lm_head"]
    assert calls == [(name, True) for name in names]
    assert not holds_averages(model, callback.ema)  # they differ: the check means something
    batch = {key: torch.stack([row[key] for row in data[:8]]) for key in data[0]}
    with torch.no_grad():
        assert evaluation["eval_loss"] == float(callback.ema.shadow(**batch).loss)


def test_a_compute_loss_that_calls_submodules_evaluates_the_averages(tmp_path: Path) -> None:
    class SplitLoss(Trainer):  # calls model.bert and model.classifier, never model itself
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = split_logits(model, inputs["input_ids"])
            loss = torch.nn.functional.cross_entropy(logits, inputs["labels"])
            return (loss, {"logits": logits}) if return_outputs else loss

    def split_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model.classifier(model.bert(input_ids=ids).pooler_output)

    model = make_model()
    callback = EMACallback(DECAY)
    calls = recorder(model, callback, ["bert.pooler", "classifier"])
    trainer = SplitLoss(
        model=model,
        args=make_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=[callback],
    )
    trainer.train()
    assert calls == [("bert.pooler", True), ("classifier", True)]
    batch = {key: torch.stack([row[key] for row in EVAL]) for key in EVAL[0]}

    def loss(of: torch.nn.Module) -> float:
        with torch.no_grad():
            logits = split_logits(of, batch["input_ids"])
        return float(torch.nn.functional.cross_entropy(logits, batch["labels"]))

    [evaluation] = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert evaluation["eval_loss"] == loss(callback.ema.shadow)
    # After training the hooks are gone: a manual evaluation runs on the model as it is, and
    # a swap block evaluates the averages.
    assert trainer.evaluate()["eval_loss"] == loss(model) != loss(callback.ema.shadow)
    with callback.ema.swap():
        assert trainer.evaluate()["eval_loss"] == loss(callback.ema.shadow)


def test_an_evaluation_it_was_not_told_of_warns(tmp_path: Path) -> None:
    class LateEvaluation(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_evaluate = state.global_step == 1

    callback = EMACallback(DECAY)
    trainer = Trainer(
        model=make_model(),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=[callback, LateEvaluation()],
    )
    with pytest.warns(UserWarning, match="an evaluation of the live weights") as caught:
        trainer.train()
    print(caught[0].message)


def test_arguments_are_checked_before_training() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'decay_rate'"):
        EMACallback(DECAY, decay_rate=0.9)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="apply_at_end of the wrong type at 'apply_at_end'"):
        EMACallback(DECAY, apply_at_end="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at 'decay'"):
        EMACallback(1.5)
    with pytest.raises(ValueError, match="at 'update_every'"):
        EMACallback(DECAY, update_every=0)
    with pytest.raises(TypeError, match="`use_num_updates` with a schedule"):
        EMACallback(fe.warmup(0.99), use_num_updates=True)
    with pytest.raises(RuntimeError, match="no EMA yet"):
        _ = EMACallback(DECAY).ema
    assert repr(EMACallback(DECAY, dtype=torch.float64, apply_at_end=True)) == (
        "EMACallback(0.9, dtype=torch.float64, apply_at_end=True)"
    )


def test_example_runs_with_tiny_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    result = main(steps=4, eval_every=2, output_dir=str(tmp_path))
    assert result["resumed_bit_identical"] is True
    for key in ("live_eval_loss", "ema_eval_loss"):
        assert isinstance(result[key], float), result
    assert "bit-identical" in capsys.readouterr().out


def test_the_core_never_imports_transformers_and_a_missing_one_is_named() -> None:
    code = (
        "import sys\n"
        "import functional_ema\n"
        "assert 'transformers' not in sys.modules, 'import functional_ema imported transformers'\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    import functional_ema.transformers\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'functional_ema[transformers]'" in done.stdout
    print(done.stdout.strip())
