"""TFX-style pipeline over `stl10_keras`: ExampleGen -> Transform -> Trainer ->
Evaluator -> Pusher, cached by fingerprint, resumable, gated by a blessing.

`python -m pipelines.run --help`; the components are in `pipelines.components`,
the wiring and the runner in `pipelines.pipeline`.
"""
