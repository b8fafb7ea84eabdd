"""Segment many queries into a folder: workers that prepare the next queries, threads that write finished ones,
one failing query reported without stopping the others, every output written whole or not at all."""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from tqdm import tqdm

from iris_nnu.errors import IrisInputError, brief
from iris_nnu.files import write_atomic
from iris_nnu.inference.images import Query, write_segmentation

if TYPE_CHECKING:
    from iris_nnu.inference.predictor import CaseResult, IrisPredictor, PreparedQuery, QueryPreparation, Tasks


def prepared_in_turn(prepare: QueryPreparation, queries: Sequence[Sequence[str]],
                     executor: concurrent.futures.Executor | None, ahead: int) -> Iterator[Callable[[], PreparedQuery]]:
    """Per query, in order, a call that returns it prepared (or raises its error); with `executor`, up to `ahead`
    queries beyond the current one are prepared in the background."""
    if executor is None:
        for images in queries:
            yield functools.partial(prepare, images)
        return
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    for images in queries:
        pending.append(executor.submit(prepare, images))
        if len(pending) > ahead:
            yield pending.popleft().result
    while pending:
        yield pending.popleft().result


def failure_line(query: Query, error: Exception) -> str:
    """One line for a query that failed: the error itself for bad input, else its type and message."""
    if isinstance(error, IrisInputError):
        return str(error)
    return f"{query.images[0]}: failed ({type(error).__name__}: {brief(error)})"


def run_queries(predictor: IrisPredictor, queries: Sequence[Query], output_folder: str, task: Tasks,
                pool: Tasks | None = None, retrieval_top_k: int = 1, save_probabilities: bool = False,
                progress: bool = True, report: Callable[[str], None] = print,
                reference_names: Sequence[str] | None = None, preprocessing_workers: int = 0,
                export_workers: int = 0) -> list[str]:
    """Segment every query into output_folder/{case}{ending}; returns one line per query that failed.

    A failing query (unreadable, not 3D, ...) does not stop the others; nothing of it is written.
    `preprocessing_workers` processes read and preprocess the next queries while the network segments one
    (nnU-Net's -npp); `export_workers` threads write finished ones (-nps); 0: in this process, in turn."""
    os.makedirs(output_folder, exist_ok=True)
    predictor.follow(task)
    failures, runnable = [], []
    for query in queries:
        target = os.path.join(output_folder, query.name)
        if os.path.abspath(target + query.output_ending) in {os.path.abspath(p) for p in query.images}:
            failures.append(f"{query.images[0]}: its output would overwrite it; choose another OUTPUT folder")
        else:
            runnable.append(query)
    with contextlib.ExitStack() as stack:
        preparing = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
            preprocessing_workers, mp_context=multiprocessing.get_context("spawn"))) \
            if preprocessing_workers else None
        writing = stack.enter_context(concurrent.futures.ThreadPoolExecutor(export_workers)) \
            if export_workers else None
        prepared = prepared_in_turn(predictor.query_preparation, [q.images for q in runnable], preparing,
                                    preprocessing_workers)
        written = []
        for query, get in tqdm(zip(runnable, prepared), total=len(runnable), desc="iris_predict", unit="query",
                               disable=not progress):
            target = os.path.join(output_folder, query.name)
            try:
                result = predictor.predict_prepared(get(), task, pool, retrieval_top_k, save_probabilities)
                for warning in result.warnings:
                    report(f"warning: {query.images[0]}: {warning}")
                if result.retrieved:
                    def name(i: int) -> str:
                        return reference_names[i] if reference_names else f"#{i}"
                    picks = "; ".join(f"{value}: {', '.join(name(i) for i in refs)}"
                                      for value, refs in result.retrieved.items())
                    report(f"{query.name}: retrieval picked, per class, {picks}")
                if writing is None:
                    write_result(result, target, query.output_ending, save_probabilities)
                else:
                    written.append((query, writing.submit(write_result, result, target, query.output_ending,
                                                          save_probabilities)))
                del result
            except Exception as e:  # noqa: BLE001 - one bad query must not stop the batch; reported at the end
                failures.append(failure_line(query, e))
        for query, future in written:
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - as above
                failures.append(failure_line(query, e))
    return failures


def write_result(result: CaseResult, target: str, ending: str, save_probabilities: bool) -> None:
    """target{ending}, with `save_probabilities` also target.npz and .pkl (nnU-Net's --save_probabilities).

    Probabilities first, the segmentation last (its presence marks a finished case); all or nothing."""
    written = []
    try:
        if save_probabilities:
            write_atomic(target + ".npz", lambda tmp: np.savez_compressed(
                tmp, probabilities=result.probabilities, classes=np.array(result.classes)))
            written.append(target + ".npz")
            write_atomic(target + ".pkl", lambda tmp: save_pickle(result.properties, tmp))
            written.append(target + ".pkl")
        write_segmentation(result.segmentation, target + ending, result.properties, result.reader_writer)
    except BaseException:
        for path in written:
            os.remove(path)
        raise
