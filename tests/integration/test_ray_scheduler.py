"""Ray Data's scheduling loop in our local Ray: calmed in every worker process (ray_compat), and a
streaming split through the calmed loop still delivers every row once."""

from __future__ import annotations


def test_every_worker_of_our_local_ray_calms_the_data_scheduler(ray_local):
    ray = ray_local

    @ray.remote
    def calmed() -> bool:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor

        return bool(getattr(StreamingExecutor._scheduling_loop_step, "calmed", False))

    assert ray.get(calmed.remote()), "worker_process_setup_hook did not run ray_compat.worker_setup"

    @ray.remote
    def consume(split) -> list[int]:
        return [int(i) for batch in split.iter_batches(batch_size=50) for i in batch["id"]]

    splits = ray.data.range(1000, override_num_blocks=20).map_batches(lambda b: b).streaming_split(2, equal=False)
    rows = ray.get([consume.remote(s) for s in splits])
    assert sorted(rows[0] + rows[1]) == list(range(1000))
