"""mae_jax.trainer: the pieces that pretraining and fine-tuning share."""

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import trainer
from mae_jax import writers


def _linear_grad_fn():
  """value_and_grad of a mean squared error whose aux counts the micro-batches seen, in order."""

  def loss_fn(w, aux, micro, index):
    x, y = micro
    loss = jnp.mean((x @ w["w"] - y) ** 2)
    return loss, aux * 10 + index + 1

  return jax.value_and_grad(loss_fn, has_aux=True)


def test_accumulate_gradients_equals_the_full_batch_and_threads_aux_in_order():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
  w = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  grad_fn = _linear_grad_fn()
  (full_loss, full_aux), full_grads = trainer.accumulate_gradients(grad_fn, w, (x, y), 1, 0)
  (loss, aux), grads = jax.jit(trainer.accumulate_gradients, static_argnums=(0, 3))(
      grad_fn, w, (x, y), 4, 0)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
  np.testing.assert_allclose(grads["w"], full_grads["w"], rtol=1e-5)
  assert int(full_aux) == 1        # one batch, index 0
  assert int(aux) == 1234          # micro-batches 0, 1, 2, 3, each seeing the previous aux


def test_accumulate_gradients_micro_batch_j_takes_every_a_th_example():
  """Micro-batch j is examples j, j + A, ...: each stays spread over the devices."""

  def grad_fn(w, aux, micro, index):
    return (jnp.sum(micro[0]) * w, aux.at[index].set(micro[0])), w

  x = jnp.arange(6.0)
  (loss, seen), _ = trainer.accumulate_gradients(grad_fn, jnp.ones(()), (x,), 2,
                                                 jnp.zeros((2, 3)))
  np.testing.assert_array_equal(seen, [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]])
  np.testing.assert_allclose(loss, 15.0 / 2)


def test_step_metrics_flags_a_nonfinite_step():
  metrics = trainer.step_metrics(jnp.float32(1.0), jnp.float32(2.0), jnp.float32(0.1),
                                 jnp.bool_(False))
  assert set(metrics) == {"loss", "grad_norm", "lr", "nonfinite"}
  assert float(metrics["nonfinite"]) == 1.0


def test_a_run_opens_its_training_data_once(monkeypatch):
  from mae_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  opened = []
  real = input_pipeline.open_source
  monkeypatch.setattr(input_pipeline, "open_source",
                      lambda *a, **k: opened.append(a) or real(*a, **k))
  config = config_lib.pretrain_config("vit_b")
  config.input.dataset = "skimage_photos"
  config.input.batch_size = 4
  config.input.num_workers = 0
  config.total_steps = 10
  config.warmup_steps = 2
  job = trainer.prepare(config)
  assert job.num_examples == len(job.source) and job.total == 10
  # What train.train_and_evaluate does with the job's source.
  batches = input_pipeline.create_iterator(config.input, image_size=16, seed=0, train=True,
                                           process_index=0, process_count=1, source=job.source)
  assert next(batches)["image"].shape == (4, 16, 16, 3)
  batches.close()
  assert len(opened) == 1


def test_a_float16_run_reports_its_loss_scale_and_other_runs_do_not(caplog):
  class Rows:  # what the Reporter writes to metrics.jsonl and TensorBoard
    def __init__(self):
      self.rows = []

    def write_scalars(self, step, row):
      self.rows.append((step, row))

  caplog.set_level("INFO")
  for scale, expected in [({"scale": jnp.float32(2.0**15)}, 2.0**15), (None, None)]:
    rows = Rows()
    reporter = trainer.Reporter(rows, writers.ProgressBar(2, enabled=False), start=0, total=2,
                                log_every=2, batch_size=4, num_examples=8)
    for step in (1, 2):
      reporter.add(step, trainer.step_metrics(jnp.float32(1.0), jnp.float32(2.0),
                                              jnp.float32(0.1), jnp.bool_(True), scale))
    reporter.flush()
    (step, row), = rows.rows
    assert step == 2 and row.get("loss_scale") == expected
    assert ("loss scale 32768" in caplog.text) == (expected is not None)
    caplog.clear()


def test_a_first_ctrl_c_asks_for_a_save_and_a_second_stops_at_once():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with trainer.Preemption() as preemption:
      assert not preemption.reached(1)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)  # the handler runs between bytecodes of the main thread
      assert preemption.reached(2) and preemption.reason == "Ctrl-C"
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # A handler of the caller's own is left alone.
    own = lambda signum, frame: None
    signal.signal(signal.SIGINT, own)
    with trainer.Preemption():
      assert signal.getsignal(signal.SIGINT) is own
  finally:
    signal.signal(signal.SIGINT, previous)


def test_the_start_line_says_how_steps_relate_to_passes_over_the_data():
  """The demo (7 photos, batch 64) once logged '1 steps per epoch' beside rows whose epoch
  counter grows by 9.1 a step."""
  import ml_collections  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  def job(num_examples, steps_per_epoch):
    return trainer.Job(config=ml_collections.ConfigDict({"input": {"batch_size": 64}}),
                       mesh=None, num_examples=num_examples, steps_per_epoch=steps_per_epoch,
                       total=10, learning_rate=1e-3, source=None, eval_source=None)
  assert job(7, 1).epoch_text() == ("9.1 passes over the 7 examples per step (an epoch of the "
                                    "schedule is 1 step)")
  assert job(1000, 15).epoch_text() == "15 steps per epoch of 1,000 examples"
  assert job(64, 1).epoch_text() == "1 step per epoch of 64 examples"
