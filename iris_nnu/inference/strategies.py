"""Iris's inference strategies beyond one reference's embedding (Iris, "Inference strategies"), as functions.

- ensemble: per class, the mean of the references' embeddings where the class is present (TaskEmbedding.mean);
- retrieval: `select_references` keeps per class the references most similar to the query's own embedding;
- tune: `tune_task` optimises the task tokens on the reference crops, the network frozen;
and `calibrated_threshold`, the decision threshold under which a task segments its own references best (`run_threshold`:
the threshold a run segments at, calibrated by default, and with `calibrated_window` its window step); `run_fusion`:
whether a run fuses Iris with registration, measured on its references by default.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from iris_nnu.errors import IrisInputError
from iris_nnu.inference.evaluate import dice_per_class
from iris_nnu.inference.export import (DecisionThreshold, describe_threshold, indices_to_values,
                                       keep_largest_components, threshold_logit, threshold_logits)
from iris_nnu.inference.images import read_geometry, read_label, reader_writer_for
from iris_nnu.inference.references import Crop, ReferenceCase
from iris_nnu.model import IrisNetwork, TaskEmbedding
from iris_nnu.model.loss import MaskedDiceBCELoss
from iris_nnu.orientation import to_storage

if TYPE_CHECKING:
    from iris_nnu.inference.predictor import IrisPredictor, PreparedQuery, Tasks
    from iris_nnu.model.position import ScanFrame

STRATEGIES = ("oneshot", "ensemble", "retrieval", "tune")
DEFAULT_TUNE_STEPS = 20
DEFAULT_TUNE_LR = 1e-2  # Adam on the tokens; the paper gives no value: a few steps should move them noticeably
# the decision thresholds calibrated_threshold tries (probability of the winning class), highest first: below 0.5
# for structures the network ranks right but is unsure of (deep brain structures), above it for ones it spreads
# beyond their edges (abdominal kidneys: twice their volume at 0.5, their Dice rising up to 0.99; README Results)
CALIBRATION_THRESHOLDS = (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.03, 0.02, 0.01)
AUTO_THRESHOLD = "auto"
DEFAULT_THRESHOLD = 0.5  # nnU-Net's sigmoid rule: a task file calibrated at none
AUTO_STEP = "auto"
# the window step of iris_predict (-step_size auto) where the references do not gain from denser windows; nnU-Net's
# is 0.5. At 0.6 a 1.5 mm brain takes 150 windows instead of 175 and the abdomen 294 instead of 448, at the same Dice
# (bundled model, one reference: brains 0.565 against 0.564, the abdomen 0.762 against 0.764; README Results)
DEFAULT_STEP_SIZE = 0.6
# -step_size auto also segments the references with windows this much denser and keeps that step where they come out
# better by STEP_MARGIN (README Results, stage 15: on head-and-neck CT the reference's own Dice 0.475 -> 0.525 and its
# queries' 0.314 -> 0.336 against 0.5; brains +0.003 and the abdomen -0.004 on their references, so neither takes it)
DENSE_STEP_SIZE = 0.33
STEP_MARGIN = 0.02
# A CT's windows run over its body's box alone (plans.BODY_BOX_KEY), so the dense step costs less than the default one
# over the whole scan did, and there the references stopped telling the steps apart: head-and-neck CT from
# headneck_train_034, its own Dice 0.626 / 0.630 at 0.6 / 0.33 (over the whole scan 0.471 / 0.692) while its 6
# queries score 0.324 / 0.445 fused (README Results). So a CT run takes the dense step without asking them.
CT_STEPS = (DENSE_STEP_SIZE,)
# iris_predict --postprocess: "auto" keeps the largest component of the classes whose references gain from it
AUTO_POSTPROCESS = "auto"
POSTPROCESS_SETTINGS = (AUTO_POSTPROCESS, "none", "largest_component")
LISTED_CLASSES = 12  # class values a line names before "..."
AUTO_FUSION = "auto"
# --registration_fusion on: REGISTRATION_WEIGHT logits added to a class's logit where the registered references' label
# covers a voxel, and taken away where it does not, decided at the network's calibrated threshold (fuse_with_atlas).
# Measured offline (stage 20; one reference; the network alone / its probability averaged with the label in equal
# shares, as before 2026-12-07 / this rule at weights 1, 2, 3, 4): abdomen, 6 references x 3 queries, 0.647 / 0.647 /
# 0.679, 0.693, 0.695, 0.685; hippocampus, 20 queries, 0.815 / 0.775 / 0.816, 0.815, 0.813, 0.809; head-and-neck CT,
# 6 queries, 0.339 / 0.568 / 0.380, 0.441, 0.493, 0.515 (its network is weaker than its registration: with two
# references `auto` can pick the registration alone per class). Equal shares at 0.5
# made the registered label decide alone (any voxel it covers passes, any other fails) wherever the registration went
# astray; this rule lets a confident network outvote it.
REGISTRATION_WEIGHT = 2.0
# A fused class whose edge the references' images hide (registration.hidden_edge_share at HIDDEN_EDGE_SHARE or more,
# averaged over the references that hold it) takes HIDDEN_EDGE_FACTOR times the weight: the network, which reads
# edges, misses it, and the registration carries it from the anatomy around. Whole brains, 3 held-out queries, from
# oasis_007 / oasis_014: the 12 subcortical structures 0.740 -> 0.764 / 0.770 -> 0.793 (ANTs SyN 0.764 / 0.784), all 85
# 0.639 -> 0.641 / 0.632 -> 0.636 (the thalamus 0.71 -> 0.82 from oasis_007); weight 4 for every class instead costs the
# cortex (0.631 / 0.628). Elsewhere mixed: head-and-neck CT +0.013 / -0.008 (references 060 / 034), the abdomen
# +0.009 / -0.019 from the two of six references with such a class (020 / 022; README Results)
HIDDEN_EDGE_SHARE = 0.2
HIDDEN_EDGE_FACTOR = 2.0
# a run's registration fusion -> each class's registration weight (None: no registration; inf: the registration alone)
REGISTRATION_WEIGHTS: dict[str, float | None] = {"off": None, "on": REGISTRATION_WEIGHT, "registration": math.inf}
FUSION_SETTINGS = (AUTO_FUSION, *REGISTRATION_WEIGHTS)  # iris_predict --registration_fusion
# how run_fusion's line names each way a reference was segmented
FUSION_DESCRIPTIONS = {"off": "by the network alone", "on": "fused", "registration": "by the registration alone"}
# --registration_fusion auto: a query whose registration looks less like it than this share of the references' (the
# correlation, registration_similarity) is segmented by the network alone. Head-and-neck CT, six queries onto one
# reference (0.83 onto the other): the three at 0.75 and below lost their organs (registration Dice 0.00-0.13),
# those at 0.80 and above kept them (0.38-0.61); the abdomen's and brains' queries all lie above 0.9
SIMILARITY_SHARE = 0.8
# --registration_fusion auto with one reference: a reference shorter than this along an axis is a crop around its
# structures (the hippocampus's: 29-41 mm; the other members 160 mm and more), which the network sees whole in a
# window or two: there the registration only moves its edges, and costs more than the network (20 held-out
# hippocampus crops from hippocampus_244: 0.817 by the network alone in 0.3 s, 0.806 fused in 0.98 s; ANTs SyN 0.7 s)
CROP_EXTENT_MM = 100.0


def cosine_similarity(a: TaskEmbedding, a_index: tuple[int, int], b: TaskEmbedding, b_index: tuple[int, int]) -> float:
    """Cosine similarity of two classes' full embeddings (all scales, foreground and context tokens)."""
    va = torch.cat([t[a_index].flatten().float() for t in a.tokens])
    vb = torch.cat([t[b_index].flatten().float() for t in b.tokens]).to(va.device)
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=0))


def select_references(pool: TaskEmbedding, query: TaskEmbedding, top_k: int = 1,
                      ) -> tuple[TaskEmbedding, dict[int, list[int]]]:
    """Object-level retrieval: per class the query predicted, keep the `top_k` pool references most similar to
    the query's own embedding; other classes keep every reference. Returns the averaged task and the picks."""
    keep = pool.present.clone()
    picks: dict[int, list[int]] = {}
    for k, value in enumerate(pool.classes):
        if value not in query.classes:
            continue
        q = query.classes.index(value)
        candidates = [b for b in range(pool.batch_size) if bool(pool.present[b, k])]
        scores = [cosine_similarity(query, (0, q), pool, (b, k)) for b in candidates]
        chosen = [candidates[i] for i in np.argsort(scores)[::-1][:top_k]]
        keep[:, k] = False
        keep[chosen, k] = True
        picks[value] = sorted(chosen)
    return dataclasses.replace(pool, present=keep).mean(), picks


def tune_task(network: IrisNetwork, task: TaskEmbedding, crops: Sequence[Sequence[Crop]], present: torch.Tensor,
              steps: int = DEFAULT_TUNE_STEPS, lr: float = DEFAULT_TUNE_LR, position_prior: bool = True,
              device: torch.device | str = "cpu") -> tuple[TaskEmbedding, list[float]]:
    """In-context tuning: `network` frozen, Adam on `task`'s tokens, Dice + BCE on the reference crops (per reference
    r, `crops[r]`, whose labels index the task's classes; `present[r]`: the classes reference r holds). Returns the
    tuned task (no mirrored tokens: they would be of the untuned references) and the loss at each step (the first
    untuned)."""
    if steps < 0 or lr <= 0:
        raise ValueError(f"tune needs steps >= 0 and lr > 0, got {steps}, {lr}")
    positions = task.positions if position_prior else None
    items = []
    for r, reference_crops in enumerate(crops):
        valid = present[r].to(device)[None]  # a reference says nothing of its absent classes
        for crop in reference_crops:
            target = np.stack([crop.labels == i for i in range(1, task.num_classes + 1)])
            coordinates = None if crop.frame is None else \
                crop.frame.coordinates(crop.origin, crop.labels.shape, device)[None]
            items.append((torch.from_numpy(crop.image)[None].to(device),
                          torch.from_numpy(target)[None].to(device, torch.float32), valid, coordinates))
    params = [torch.nn.Parameter(t.detach().clone().to(device)) for t in task.tokens]
    optimizer = torch.optim.Adam(params, lr=lr)
    loss_fn = MaskedDiceBCELoss()
    frozen = [(p, p.requires_grad) for p in network.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        network.check_task(task)
        for step in range(steps + 1):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            with torch.set_grad_enabled(step < steps):
                for image, target, valid, coordinates in items:
                    current = TaskEmbedding(params, task.classes, task.present, task.model_id, positions)
                    loss = loss_fn(network(image, current, coordinates, check_model=False), target, valid) / len(items)
                    if step < steps:
                        loss.backward()
                    total += loss.item()
            losses.append(total)
            if step < steps:
                optimizer.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return dataclasses.replace(task, tokens=[p.detach() for p in params], mirrored=None), losses


class ReferenceScan(NamedTuple):
    """A reference read and preprocessed as the run's queries are, with its scan frame and its label: what calibration
    segments and scores (reference_scans)."""

    prepared: PreparedQuery
    frame: ScanFrame | None
    truth: np.ndarray


def reference_scans(predictor: IrisPredictor, references: Sequence[ReferenceCase], task: Tasks) -> list[ReferenceScan]:
    """Each reference prepared once for calibration, whatever the window steps it is then segmented at."""
    predictor.follow(task)
    scans = []
    for case in references:
        prepared = predictor.query_preparation(case.images)
        truth = read_label(case.label, reader_writer_for(case.label, predictor.reader_writer_class))[0]
        scans.append(ReferenceScan(prepared, predictor.prepared_frame(prepared.data, prepared.properties), truth))
    return scans


class ThresholdCalibration(NamedTuple):
    """calibrated_threshold's result: the threshold chosen (one per class value, or one for all), the references'
    mean Dice at each single threshold, their mean Dice under the threshold chosen, and the class values whose
    largest connected component alone segments the references better under it."""

    threshold: DecisionThreshold
    dice: dict[float, float]
    own: float
    largest_component: tuple[int, ...] = ()

    @property
    def single(self) -> float:
        """The best single threshold."""
        return best_threshold(self.dice)


def calibrated_threshold(predictor: IrisPredictor, references: Sequence[ReferenceCase], task: Tasks,
                         thresholds: Sequence[float] = CALIBRATION_THRESHOLDS,
                         scans: Sequence[ReferenceScan] | None = None, per_class: bool = True) -> ThresholdCalibration:
    """The decision threshold under which `task` segments its own reference scans best, per class value (each
    class's Dice averaged over the references that hold it; a class none holds gets the best single threshold) or,
    with `per_class=False`, one for all (mean Dice over the classes each reference holds, averaged over the
    references); ties go to the higher threshold, and one above 0.5 needs a margin (best_threshold). A model trained
    on other anatomy can be right about which class a voxel is but unsure whether it is one (brains after CT: the
    argmax held, the probabilities ran low), or spread a class beyond its edges (abdominal kidneys); the references
    show at what level, and the level differs by structure (whole brains: the thalamus and ventral DC run low, the
    cortex does not; README Results). A voxel's class is its most probable one, so each class's Dice
    depends on its own threshold alone and each is calibrated on its own. Costs one segmentation per reference.
    `scans`: the references already prepared (reference_scans of the same task)."""
    scans = reference_scans(predictor, references, task) if scans is None else scans
    classes = predictor.per_fold(task)[0].classes
    floors = {t: threshold_logit(t) for t in thresholds}
    # per reference: Dice per held class at each threshold
    tables: list[dict[float, dict[int, float]]] = []
    segmented: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per reference: values, scores, truth
    for prepared, frame, truth in scans:
        result = predictor.segment_preprocessed(prepared.data, prepared.properties, task, scores=True,
                                                threshold=min(thresholds), frame=frame)
        values = to_storage(indices_to_values(result.labels, classes), prepared.properties)
        scores = to_storage(result.scores, prepared.properties)
        held = [c for c in classes if (truth == c).any()]
        tables.append({t: dice_per_class(truth, np.where(scores > floor, values, 0), held)
                       for t, floor in floors.items()})
        segmented.append((values, scores, truth))
    dice = {t: float(np.mean([np.mean(list(table[t].values())) for table in tables])) for t in thresholds}
    single = best_threshold(dice)
    if not per_class or len(thresholds) == 1:
        chosen, own = single, dice[single]
    else:
        chosen = {}
        for c in classes:
            scored = {t: [table[t][c] for table in tables if c in table[t]] for t in thresholds}
            chosen[c] = best_threshold({t: float(np.mean(d)) for t, d in scored.items()}) if scored[single] \
                else single
        own = float(np.mean([np.mean([table[chosen[c]][c] for c in table[single]]) for table in tables]))
    return ThresholdCalibration(chosen, dice, own, components_that_help(segmented, chosen, classes))


def components_that_help(segmented: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], threshold: DecisionThreshold,
                         classes: Sequence[int]) -> tuple[int, ...]:
    """The class values whose largest connected component alone scores the references better (mean Dice over the
    references that hold the class, strictly higher: nnU-Net's rule for its postprocessing, decided there on
    cross-validation) than the whole class, each segmented under `threshold`; `segmented`: per reference its most
    probable class values, their logits and its label. A class the network spreads in islands (abdominal kidneys)
    gains; one whose references come in pieces does not."""
    lut = np.zeros(max(classes) + 1, dtype=np.float32)
    lut[list(classes)] = threshold_logits(threshold, classes)
    whole: dict[int, list[float]] = {}
    largest: dict[int, list[float]] = {}
    for values, scores, truth in segmented:
        held = [c for c in classes if (truth == c).any()]
        segmentation = np.where(scores > lut[values], values, 0).astype(values.dtype)
        for c, d in dice_per_class(truth, segmentation, held).items():
            whole.setdefault(c, []).append(d)
        for c, d in dice_per_class(truth, keep_largest_components(segmentation, held), held).items():
            largest.setdefault(c, []).append(d)
    return tuple(c for c in classes if c in whole and np.mean(largest[c]) > np.mean(whole[c]))


# a threshold above 0.5 must beat the best at or below it by this much on the references: thinning a structure to its
# surest core pays on its own scan more than on a query (measured: the abdominal kidneys' references gain 0.17-0.19
# and their queries 0.04-0.29; the CT mandible's reference 0.019 and its queries -0.05; README Results)
RAISE_MARGIN = 0.05


def best_threshold(dice: Mapping[float, float]) -> float:
    """The threshold of the highest Dice (to 4 decimals), the higher threshold on a tie; one above DEFAULT_THRESHOLD
    only where it beats the best at or below DEFAULT_THRESHOLD by RAISE_MARGIN."""
    def best(thresholds: list[float]) -> float:
        return max(thresholds, key=lambda t: (round(dice[t], 4), t))

    chosen = best(list(dice))
    lower = [t for t in dice if t <= DEFAULT_THRESHOLD]
    if chosen > DEFAULT_THRESHOLD and lower and dice[chosen] < dice[best(lower)] + RAISE_MARGIN:
        return best(lower)
    return chosen


def threshold_source(calibration: ThresholdCalibration) -> str:
    """The references' Dice under the threshold chosen and, where it is per class, under the best single one."""
    line = f"their own Dice {calibration.own:.3f}"
    if isinstance(calibration.threshold, Mapping):
        line += f"; {calibration.dice[calibration.single]:.3f} at one threshold {calibration.single}"
    return line


class WindowCalibration(NamedTuple):
    """calibrated_window's result: the window step chosen, and the threshold calibration at each step."""

    step: float
    calibrations: dict[float, ThresholdCalibration]

    @property
    def threshold(self) -> DecisionThreshold:
        return self.calibrations[self.step].threshold

    @property
    def dice(self) -> dict[float, dict[float, float]]:
        """The references' mean Dice per step and single threshold."""
        return {step: c.dice for step, c in self.calibrations.items()}

    def line(self, threshold_calibrated: bool = True) -> str:
        """What a run prints: the choice, and the references' Dice under it and under the other steps."""
        others = "".join(f"; {c.own:.3f} at step {s}" for s, c in self.calibrations.items() if s != self.step)
        threshold = describe_threshold(self.threshold)
        step = f"window step {self.step}" + ("" if others else " (CT: the windows over the body, dense)")
        chosen = step + (f" and decision threshold {threshold}" if threshold_calibrated
                         else f" at decision threshold {threshold}")
        return f"{chosen} from the references ({threshold_source(self.calibrations[self.step])}{others})"


def auto_steps(modality: str) -> tuple[float, ...]:
    """The window steps -step_size auto weighs for a run of `modality`, the default first (CT_STEPS for a CT)."""
    return CT_STEPS if modality == "CT" else (DEFAULT_STEP_SIZE, DENSE_STEP_SIZE)


def calibrated_window(predictor: IrisPredictor, references: Sequence[ReferenceCase], task: Tasks,
                      thresholds: Sequence[float] = CALIBRATION_THRESHOLDS,
                      steps: Sequence[float] | None = None, per_class: bool = True,
                      ) -> WindowCalibration:
    """calibrated_threshold under each window step of `steps` (None: auto_steps of the run; the first the default): a
    later step is kept where the references come out better under it by STEP_MARGIN. A network unsure away from its
    window's centre gains from denser windows (head-and-neck CT); others only pay for them. Leaves the predictor's
    step as it was. `per_class`:
    as calibrated_threshold's."""
    original = predictor.tile_step_size
    steps = auto_steps(predictor.modality) if steps is None else steps
    calibrations: dict[float, ThresholdCalibration] = {}
    scans = reference_scans(predictor, references, task)  # read, preprocessed and aligned once for every step
    try:
        for step in steps:
            predictor.tile_step_size = step
            calibrations[step] = calibrated_threshold(predictor, references, task, thresholds, scans=scans,
                                                      per_class=per_class)
    finally:
        predictor.tile_step_size = original
    chosen = steps[0]
    for step in steps[1:]:
        if calibrations[step].own >= calibrations[chosen].own + STEP_MARGIN:
            chosen = step
    return WindowCalibration(chosen, calibrations)


def run_threshold(predictor: IrisPredictor, setting: float | str, task: Tasks,
                  references: Sequence[ReferenceCase] | None, step: float | str | None = None,
                  postprocess: str | None = None) -> tuple[DecisionThreshold, str | None]:
    """The decision threshold a run segments `task` at, and a line saying where it came from (None: nothing to say);
    with `step`, the run's window step is set on the predictor too (None: left as it is); with `postprocess`
    AUTO_POSTPROCESS, the classes whose largest connected component alone it keeps (predictor.largest_component): those
    whose references score better so under the run's threshold (components_that_help, from the segmentations the
    calibration made; with a threshold and a step given, one segmentation per reference), else the ones a task file
    records; none in a run segmented by the registration alone, nor for such classes in a run that fuses per class (a
    reference registered onto itself is its own label)."""
    threshold, line, calibration = _threshold_and_step(predictor, setting, task, references, step)
    if postprocess != AUTO_POSTPROCESS:
        return threshold, line
    if references and not _registration_for_every_class(predictor):
        if calibration is None:  # a threshold and a step given: the references are not segmented yet
            calibration = calibrated_threshold(predictor, references, task, (float(threshold),))
        weights = predictor.class_registration_weights if predictor.registration_fusion else None
        # a class by the registration alone (run_fusion) is its registered label, which its reference cannot test
        kept = tuple(c for c in calibration.largest_component
                     if weights is None or not math.isinf(weights.get(c, 0.0)))
    else:
        kept = () if references else (_recorded(predictor, task, "largest_component") or ())
    predictor.largest_component = kept
    if kept:
        listed = " ".join(map(str, kept[:LISTED_CLASSES])) + (" ..." if len(kept) > LISTED_CLASSES else "")
        source = "the references score better so" if references else "as the task file records"
        count = len(predictor.per_fold(task)[0].classes)
        line = "; ".join(filter(None, [line, f"the largest connected component alone of {len(kept)} of {count} "
                                             f"classes ({listed}): {source}"]))
    return threshold, line


def _threshold_and_step(predictor: IrisPredictor, setting: float | str, task: Tasks,
                        references: Sequence[ReferenceCase] | None, step: float | str | None,
                        ) -> tuple[DecisionThreshold, str | None, ThresholdCalibration | None]:
    """run_threshold's threshold, line and the calibration that chose them (None: none ran).

    A probability is used as given. AUTO_THRESHOLD: with reference scans, one per class under which the task segments
    them best (calibrated_threshold: one segmentation per reference); without (a task file), the one the file was
    calibrated at, else DEFAULT_THRESHOLD. A `step` of AUTO_STEP: with reference scans that the network segments,
    chosen with the threshold (calibrated_window: one more segmentation per reference, at the denser step); without (a
    task file), the one the file records, else DEFAULT_STEP_SIZE."""
    step_line = None
    if step is not None:
        predictor.tile_step_size = DEFAULT_STEP_SIZE if step == AUTO_STEP else float(step)
        stored_step = _recorded(predictor, task, "window_step")
        if step == AUTO_STEP and not references and stored_step is not None:
            predictor.tile_step_size = stored_step
            step_line = f"window step {stored_step}, as the task file was calibrated"
    # a fused class is decided at the network's calibrated threshold (fuse_with_atlas adds the registration's evidence
    # to its logit), so the references calibrate a fused run as they do the network alone; only the registration alone
    # (every class) has nothing to calibrate (IrisPredictor.segment_preprocessed decides it at 0.5)
    registration_alone = _registration_for_every_class(predictor)
    if step == AUTO_STEP and references and not registration_alone:
        calibrated = setting == AUTO_THRESHOLD
        window = calibrated_window(predictor, references, task,
                                   CALIBRATION_THRESHOLDS if calibrated else (float(setting),))
        predictor.tile_step_size = window.step
        return window.threshold, window.line(calibrated), window.calibrations[window.step]
    if setting != AUTO_THRESHOLD:
        return float(setting), step_line, None
    if registration_alone:
        return DEFAULT_THRESHOLD, (f"decision threshold {DEFAULT_THRESHOLD}: with --registration_fusion registration a "
                                   f"reference registered onto itself returns its own label, so it cannot calibrate "
                                   f"the run"), None
    if references:
        calibration = calibrated_threshold(predictor, references, task)
        return calibration.threshold, (f"decision threshold {describe_threshold(calibration.threshold)} from the "
                                       f"references ({threshold_source(calibration)}; at 0.5: "
                                       f"{calibration.dice[0.5]:.3f})"), calibration
    stored = _recorded(predictor, task, "decision_threshold")
    if stored is not None:
        return stored, "; ".join(filter(None, [step_line, f"decision threshold {describe_threshold(stored)}, as the "
                                                          f"task file was calibrated"])), None
    return DEFAULT_THRESHOLD, step_line, None


def _registration_for_every_class(predictor: IrisPredictor) -> bool:
    """Whether the run segments every class by the registration alone (its references cannot calibrate it)."""
    return (predictor.registration_fusion and predictor.class_registration_weights is None
            and math.isinf(predictor.registration_weight))


def _recorded(predictor: IrisPredictor, task: Tasks, field: str):
    """What the task (every fold's alike) records in `field`; None where not recorded or the folds differ."""
    values = [getattr(t, field) for t in predictor.per_fold(task)]
    return values[0] if all(v == values[0] for v in values[1:]) else None


def task_file_threshold(predictor: IrisPredictor, setting: float | str, task: Tasks,
                        references: Sequence[ReferenceCase] | None) -> tuple[DecisionThreshold, str | None]:
    """The decision threshold a --save_task file records, and a line when it is not the run's: the run's (a fused run
    is decided at the network's), except in a run segmented by the registration alone, where it is the one
    run_threshold gives the network alone (a task file segments by the network alone: it holds no reference image to
    register)."""
    if not _registration_for_every_class(predictor):
        return predictor.decision_threshold, None
    predictor.registration_fusion = False
    try:
        threshold, _ = run_threshold(predictor, setting, task, references)
    finally:
        predictor.registration_fusion = True
    return threshold, (f"the task file records decision threshold {describe_threshold(threshold)}, the network's "
                       f"alone: a task file segments without registration")


def with_calibration(task: Tasks, threshold: DecisionThreshold, step: float,
                     largest_component: bool | Sequence[int] = ()) -> Tasks:
    """`task` (one, or one per fold) recording the decision threshold and window step it segments at, and the classes
    whose largest component alone it keeps (True: all; as IrisPredictor.largest_component), for a task file."""
    def recorded(t: TaskEmbedding) -> TaskEmbedding:
        kept = t.classes if largest_component is True else [c for c in t.classes if c in (largest_component or ())]
        return dataclasses.replace(t, decision_threshold=threshold, window_step=step, largest_component=kept)

    return recorded(task) if isinstance(task, TaskEmbedding) else [recorded(t) for t in task]


def set_fusion(predictor: IrisPredictor, setting: str | Mapping[int, str], similarity_floor: float | None = None,
               ) -> None:
    """Make `predictor` segment as the fusion `setting` ("off", "on" or "registration"; or one of them per class
    value, as run_fusion decides per class) says; with `similarity_floor`, a query registered less alike than it is
    segmented by the network alone (IrisPredictor.registration_floor)."""
    predictor.registration_floor = similarity_floor
    if isinstance(setting, str):
        weight = REGISTRATION_WEIGHTS[setting]
        predictor.registration_fusion = weight is not None
        predictor.class_registration_weights = None
        if weight is not None:
            predictor.registration_weight = weight
        return
    predictor.registration_fusion = True  # the network alone: weight 0
    predictor.class_registration_weights = {int(c): REGISTRATION_WEIGHTS[s] or 0.0 for c, s in setting.items()}


@dataclasses.dataclass(frozen=True)
class FusionComparison:
    """fusion_comparison's result: per setting, the second reference's Dice per class; and how alike it looked to
    the first once registered (registration_similarity; None where the registration failed)."""

    dice: dict[str, dict[int, float]]
    similarity: float | None


def fusion_comparison(predictor: IrisPredictor, first: ReferenceCase, second: ReferenceCase,
                      classes: Sequence[int] | None = None) -> FusionComparison:
    """Dice per class of `second` segmented one-shot from `first` (the classes both hold), per fusion setting: "off"
    (the network alone at the threshold calibrated on `first`, a run's default), "on" (fused with `first`'s label
    registered onto it, at that threshold) and "registration" (that label alone, at 0.5); empty where they share no
    class.
    Leaves the predictor's references, threshold and fusion setting changed: encode the run's references after it."""
    set_fusion(predictor, "on")  # `first` keeps its atlas; queries keep their original grid
    encoded = predictor.encode_references([first], classes)
    task, _ = predictor.task_for_strategy(encoded.pool, "oneshot", encoded)
    truth = read_label(second.label, reader_writer_for(second.label, predictor.reader_writer_class))[0]
    held = [c for c in predictor.per_fold(task)[0].classes if (truth == c).any()]
    if not held:
        return FusionComparison({setting: {} for setting in REGISTRATION_WEIGHTS}, None)
    predictor.follow(task)
    query = predictor.query_preparation(second.images)  # read and preprocessed once, its original grid kept
    registered, _ = predictor.registered_atlas(query, list(predictor.per_fold(task)[0].classes))  # registered once
    segmentations = {}
    calibrated = calibrated_threshold(predictor, [first], task).threshold  # the network alone on `first`
    for setting in ("on", "registration") if registered is not None else ():  # failed: the network alone
        set_fusion(predictor, setting)
        predictor.decision_threshold = calibrated
        segmentations[setting] = predictor.predict_prepared(query, task, atlas=registered.maps).segmentation
    set_fusion(predictor, "off")
    predictor.decision_threshold = calibrated
    segmentations["off"] = predictor.predict_prepared(query, task).segmentation
    return FusionComparison({setting: dice_per_class(truth, segmentations[setting], held)
                             if setting in segmentations else {} for setting in REGISTRATION_WEIGHTS},
                            None if registered is None else registered.similarity)


class FusionChoice(NamedTuple):
    """run_fusion's result: the setting (set_fusion's), the least registration similarity a query's fusion needs
    (None: any), and a line saying why (None: nothing to say)."""

    setting: str | dict[int, str]
    similarity_floor: float | None
    line: str | None


def run_fusion(predictor: IrisPredictor, setting: str, references: Sequence[ReferenceCase] | None,
               classes: Sequence[int] | None = None) -> FusionChoice:
    """The fusion a run segments with (set_fusion applies it). A setting other than AUTO_FUSION as given.
    AUTO_FUSION: with two or more references, the second segmented from the first each way (fusion_comparison) and
    the best kept for each class, the network alone on a tie (a class the second lacks: the network alone): the
    registration alone wins where the network adds nothing (head-and-neck CT never trained on), the network alone or
    the fusion where it knows the scans, and on whole brains the deep structures and the cortical parcels differ
    (README Results), hence per class. Where some class is chosen otherwise than the rest, the choice is per class,
    and a query whose registration looks less alike than SIMILARITY_SHARE of the
    second reference's is segmented by the network alone: one pair of references that register well says little of
    a query cut differently. With one reference nothing measures it, and every class is fused ("on"): the network's
    calibrated decision moved by the registration's evidence gained on three members (REGISTRATION_WEIGHT; README
    Results); a reference shorter than CROP_EXTENT_MM along an axis (a crop) is left to the network alone ("off"). A
    task file holds no image: off. Call it before encoding the run's references."""
    if setting != AUTO_FUSION:
        return FusionChoice(setting, None, None)
    if not references or len(references) < 2:
        if not references:
            return FusionChoice("off", None, None)
        geometry = read_geometry(references[0].images[0])
        extent = min(n * s for n, s in zip(geometry.size, geometry.spacing))
        if extent < CROP_EXTENT_MM:
            return FusionChoice("off", None, f"registration fusion off: the reference is a crop ({extent:.0f} mm along "
                                             f"its shortest axis, under {CROP_EXTENT_MM:.0f} mm), which the network "
                                             f"segments alone (--registration_fusion on: fused)")
        return FusionChoice("on", None, "registration fusion on: with one reference the network's decision is "
                                        "moved by its label registered onto each query (--registration_fusion off: "
                                        "the network alone)")
    try:
        comparison = fusion_comparison(predictor, references[0], references[1], classes)
    except IrisInputError as error:  # e.g. the first reference lacks a --classes value the run's references hold
        return FusionChoice("off", None, f"registration fusion off: not measured on the references ({error})")
    dice = comparison.dice
    means = {s: float(np.mean(list(d.values()))) if d else float("nan") for s, d in dice.items()}
    held = sorted(set().union(*dice.values()))
    # max keeps the first of equals in REGISTRATION_WEIGHTS' order (the network alone first); unscored loses
    choice = {c: max(REGISTRATION_WEIGHTS, key=lambda s: dice[s].get(c, -1.0)) for c in held}
    described = FUSION_DESCRIPTIONS
    measured = f"{references[1].name} segmented from {references[0].name}"
    if len(set(choice.values())) > 1:
        mixed = float(np.mean([dice[choice[c]][c] for c in held]))
        counts = ", ".join(f"{described[s].removeprefix('by ')} for {sum(v == s for v in choice.values())}"
                           for s in REGISTRATION_WEIGHTS if s in choice.values())
        scores = ", ".join(f"{means[s]:.3f} {described[s]}" for s in REGISTRATION_WEIGHTS)
        line = (f"registration fusion per class: {measured} scores {mixed:.3f} with {counts} of its {len(held)} "
                f"classes (for all: {scores})")
    else:
        best = next(iter(choice.values()), "off")
        scores = ", ".join(f"{means[s]:.3f} {described[s]}" for s in sorted(REGISTRATION_WEIGHTS, key=lambda s: s != best))
        line = f"registration fusion {best}: {measured} scores {scores}"
        if best == "off":
            return FusionChoice("off", None, line)
    floor = SIMILARITY_SHARE * comparison.similarity
    return FusionChoice(choice, floor, f"{line}; a query whose registration correlates with it below {floor:.2f} "
                                       f"({SIMILARITY_SHARE} of the references' {comparison.similarity:.2f}) is "
                                       f"segmented by the network alone")


def raised_for_hidden_edges(predictor: IrisPredictor, classes: Sequence[int]) -> list[int]:
    """The fused classes whose registration weight rises because the references hide their edges
    (IrisPredictor.fusion_weights)."""
    if not predictor.registration_fusion:
        return []
    weights = dict(zip(classes, predictor.fusion_weights(classes)))
    return [c for c in predictor.hidden_edge_classes(classes) if 0 < weights[c] < math.inf]


def hidden_edge_line(predictor: IrisPredictor, classes: Sequence[int]) -> str | None:
    """What a fused run says of raised_for_hidden_edges; None where it is empty."""
    raised = raised_for_hidden_edges(predictor, classes)
    if not raised:
        return None
    listed = " ".join(map(str, raised[:LISTED_CLASSES])) + (" ..." if len(raised) > LISTED_CLASSES else "")
    return (f"registration weight x{predictor.hidden_edge_factor:g} for {len(raised)} fused class(es) whose edges the "
            f"references' images hide (hidden edge share {HIDDEN_EDGE_SHARE} or more): {listed}")


def check_fusion_source(setting: str, task_file: bool, option: str = "--registration_fusion") -> None:
    """Refuse a fusion setting that registers reference images where the run has a task file instead of them."""
    if task_file and setting in ("on", "registration"):
        raise IrisInputError(f"{option} {setting} registers the reference images to each query, and a task file holds "
                             f"none: give the references instead")


def apply_fusion(predictor: IrisPredictor, setting: str, references: Sequence[ReferenceCase] | None,
                 classes: Sequence[int] | None = None) -> str | None:
    """run_fusion, then set_fusion with its choice: the fusion a run segments with, and the line that says why (None:
    nothing to say). Call it before encoding the run's references."""
    choice = run_fusion(predictor, setting, references, classes)
    set_fusion(predictor, choice.setting, choice.similarity_floor)
    return choice.line
