"""The benchmarks, run from the checkout's root with `python -m bench.<package>.<name>`.

- `bench.harness`: what they share: the serving options of `serve run` (`serve_run`; the
  `serve run` control itself is `tests.harness`, shared with the tests), the one
  closed-loop load driver (`load`), and generic outputs (`results`).
- `bench.serving`: the served app over HTTP on this machine (`compare`, `layouts`,
  `adapters`, `profile`, `continuous`), and the peers it is compared with (`seed_server`,
  `bare`).
- `bench.engine`: in-process on the pipeline, no server (`levers`, `caches`, `threads`).
- `bench.gpu`: the GPU benchmark, `python -m bench.gpu`.
- `bench.capacity`: the simulation of the service under Serve's autoscaler, and its
  validation against a real cluster.

Figures are written under bench/results/.
"""
