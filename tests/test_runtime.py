"""The process-wide helpers that keep the compute thread the only one with an OpenMP team."""

from __future__ import annotations

import threading

import pytest
import torch

from kvcake.runtime import confine_torch_to_this_thread, in_fresh_thread


def test_a_confined_helper_thread_runs_torch_alone_and_leaves_the_others_as_they_were() -> None:
    threads_before = torch.get_num_threads()
    seen: list[int] = []

    def helper() -> None:
        confine_torch_to_this_thread()
        seen.append(torch.get_num_threads())
        torch.ones(1 << 20).add_(1)  # a parallel-sized op runs, on this thread

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    assert seen == [1]
    assert torch.get_num_threads() == threads_before


def test_in_fresh_thread_returns_the_result_and_raises_the_error_on_the_caller() -> None:
    caller = threading.get_ident()
    assert in_fresh_thread(threading.get_ident) != caller
    with pytest.raises(ValueError, match="bad model"):
        in_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("bad model")))
