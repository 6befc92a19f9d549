"""The mutation catalogue of `experiments.mutants` (docs/mutants.md): each entry removes one claim
of the codebase (one exact text replacement) and names the tests that must then fail."""
from __future__ import annotations

import dataclasses

@dataclasses.dataclass(frozen=True)
class Mutation:
  """One claim removed: in `path`, the single occurrence of `old` becomes `new`; `tests` (files or
  pytest ids, relative to the repository root) must then fail."""
  name: str
  claim: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]


M = Mutation
T_MULTITASK = "tests/test_multitask.py::"
T_PRECISION = "tests/test_precision_memory.py::"
REMAT = T_PRECISION + "test_rematerialisation_is_in_the_step_and_gives_the_same_training"
MUTATIONS: tuple[Mutation, ...] = (
    # --- the six the issue found surviving -----------------------------------------------------
    M("gradient-override-ignored", "the trainer uses the objective's `gradients` (aggregators)",
      "jtl/accumulate.py",
      "    return objective.gradients(trainable_params, frozen_params, model_state, batch, rng,\n"
      "                               trainable=trainable, **extra)",
      "    return Objective.gradients(objective, trainable_params, frozen_params, model_state, batch,\n"
      "                               rng, trainable=trainable, **extra)",
      (T_MULTITASK + "test_the_trainer_applies_the_aggregated_gradient_not_the_equal_weight_one",)),
    M("remat-ignored-cnn", "model.remat rematerialises cnn_small's stages", "jtl/models/small.py",
      "stage = nn.remat(ConvBNReLU, static_argnums=(2,)) if self.remat else ConvBNReLU",
      "stage = ConvBNReLU", (REMAT + "[model2]",)),
    M("remat-ignored-resnet", "model.remat rematerialises ResNet blocks", "jtl/models/resnet.py",
      "block = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock",
      "block = ResidualBlock", (REMAT + "[model0]",)),
    M("remat-ignored-vit", "model.remat rematerialises ViT blocks", "jtl/models/vit.py",
      "block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock",
      "block = EncoderBlock", (REMAT + "[model1]",)),
    M("teacher-accuracy-from-student-eval", "distillation's eval teacher_accuracy is the teacher's",
      "jtl/objectives/distill.py",
      'f"{prefix}teacher_accuracy": losses.accuracy(teacher_logits, labels),',
      'f"{prefix}teacher_accuracy": losses.accuracy(student_logits, labels),',
      ("tests/test_distill.py::test_unlabelled_members_are_distilled_with_alpha_one_and_their_labels"
       "_unread",
       "tests/test_distill.py::test_training_keeps_the_teacher_bit_identical_and_evaluates_the_student")),
    M("teacher-accuracy-from-student-train", "distillation's logged teacher_accuracy is the teacher's",
      "jtl/objectives/distill.py",
      "teacher_accuracy=jnp.mean(losses.accuracy(t_logits, y)))",
      "teacher_accuracy=jnp.mean(losses.accuracy(s_logits, y)))",
      ("tests/test_distill.py::test_unlabelled_members_are_distilled_with_alpha_one_and_their_labels"
       "_unread",)),
    M("supcon-ignores-labels", "SupCon's positives are the examples of the anchor's class",
      "jtl/objectives/contrastive.py",
      "per_anchor, valid = contrastive_losses.supcon(embeddings, labels, self.temperature,",
      "per_anchor, valid = contrastive_losses.supcon(\n"
      "          embeddings, jnp.arange(embeddings.shape[0]), self.temperature,",
      ("tests/test_contrastive.py::test_loss_matches_a_reference_on_independently_computed_views",)),
    M("eval-padding-mask-ignored", "the evaluator averages over real examples only (padding masked)",
      "jtl/evaluators/metrics.py", '        mask = batch["mask"]',
      '        mask = jnp.ones_like(batch["mask"])',
      ("tests/test_evaluate.py::test_every_checkpoint_once_and_equal_to_in_process",)),
    M("clip-captions-shifted", "CLIP pairs image i with caption i", "jtl/objectives/clip.py",
      "        self.model, params, model_state, (images, tokens), train=True",
      "        self.model, params, model_state, (images, jnp.roll(tokens, 1, axis=0)), train=True",
      ("tests/test_clip.py::test_each_image_is_paired_with_its_own_caption",)),
    # --- the README's other claims ---------------------------------------------------------------
    M("kd-no-t-squared", "distillation's KD term is scaled by T^2 (Hinton et al.)",
      "jtl/losses/distill.py", "  return t * t * soft_target_kl(student_logits, teacher_logits, t)",
      "  return soft_target_kl(student_logits, teacher_logits, t)",
      ("tests/test_distill.py::test_kd_loss_equals_t_squared_kl_of_the_softened_distributions",)),
    M("grl-sign", "DANN's gradient reversal multiplies the gradient by -lambda",
      "jtl/losses/domain.py", "  return (-lam.astype(g.dtype) * g, jnp.zeros_like(lam))",
      "  return (lam.astype(g.dtype) * g, jnp.zeros_like(lam))",
      ("tests/test_domain.py::test_dann_gradients_are_ce_minus_lambda_times_the_domain_gradient_on_"
       "the_backbone",)),
    M("dann-schedule", "DANN's lambda_p = 2 / (1 + exp(-10 p)) - 1", "jtl/losses/domain.py",
      "  return jnp.tanh(0.5 * gamma * p)", "  return jnp.tanh(gamma * p)",
      ("tests/test_losses_domain.py::test_dann_lambda_schedule_matches_the_paper_formula",)),
    M("coral-scale", "Deep CORAL divides by 4 d^2", "jtl/losses/domain.py",
      "  return jnp.sum(jnp.square(diff)) / (4.0 * d * d)",
      "  return jnp.sum(jnp.square(diff)) / (4.0 * d)",
      ("tests/test_domain.py::test_source_only_ignores_the_target_and_coral_mmd_add_their_term",)),
    M("mmd-cross-term", "MMD^2 subtracts twice the cross-domain kernel mean", "jtl/losses/domain.py",
      "    return jnp.mean(k_ss) + jnp.mean(k_tt) - 2.0 * jnp.mean(k_st)",
      "    return jnp.mean(k_ss) + jnp.mean(k_tt) - jnp.mean(k_st)",
      ("tests/test_domain.py::test_source_only_ignores_the_target_and_coral_mmd_add_their_term",)),
    M("pcgrad-projection", "PCGrad removes the conflicting component (projection vectors)",
      "jtl/multitask/aggregators.py",
      "    return coeffs.at[jnp.arange(n), j].add(-factor), projections + jnp.sum(conflict)",
      "    return coeffs.at[jnp.arange(n), j].add(factor), projections + jnp.sum(conflict)",
      ("tests/test_aggregators.py::test_pcgrad_two_tasks_projections_no_longer_conflict",)),
    M("uncertainty-weighting-regulariser", "uncertainty weighting adds s_t / 2",
      "jtl/multitask/weighting.py",
      "    total = jnp.sum(weights * losses.astype(jnp.float32) + 0.5 * log_variance)",
      "    total = jnp.sum(weights * losses.astype(jnp.float32))",
      ("tests/test_weighting.py::test_uncertainty_gradients_match_analytic",)),
    M("lora-b-not-zero", "LoRA's B starts at zero: the untrained adapter is the base model",
      "jtl/lora.py", '"lora_b", nn.initializers.zeros, (rank, d_out)',
      '"lora_b", nn.initializers.normal(0.02), (rank, d_out)',
      ("tests/test_lora.py::test_dense_adapter_is_x_w_plus_scaled_low_rank_update",)),
    M("frozen-batchnorm-updates", "frozen BatchNorms keep their running statistics",
      "jtl/objectives/base.py",
      "  frozen = masks.frozen_modules(trainable) if (train and trainable is not None) else frozenset()",
      "  frozen = frozenset()",
      ("tests/test_train.py::test_frozen_params_and_batchnorm_statistics_are_bit_identical",)),
    M("no-optimizer-state-pruning", "frozen parameters hold no optimizer state (mask pruning)",
      "jtl/train.py",
      "    opt_state = s.tx.init(masks.partition(params, s.trainable)[0])",
      "    opt_state = s.tx.init(params)",
      ("tests/test_train.py::test_no_optimizer_state_for_frozen_params",)),
    M("resume-fresh-optimizer", "a resumed run restores the optimizer state", "jtl/train.py",
      "  state = TrainState(jnp.asarray(step, jnp.int32), **restored)",
      "  state = TrainState(jnp.asarray(step, jnp.int32), restored['params'],\n"
      "                     restored['model_state'],\n"
      "                     s.tx.init(masks.partition(restored['params'], s.trainable)[0]))",
      ("tests/test_train.py::test_resume_after_preemption_gives_identical_params",)),
    M("phase-state-not-carried", "phases carry optimizer state over; only a joining group is fresh",
      "jtl/train.py",
      "    return state.replace(opt_state=phases.carry_over(state.opt_state, fresh))",
      "    return state.replace(opt_state=fresh)",
      ("tests/test_finetune.py::test_lpft_phase_one_compiles_a_linear_probe_and_state_carries_over",)),
    M("fsdp-not-applied", "mesh rules 'fsdp' shard params and optimizer state", "jtl/sharding.py",
      "    return NamedSharding(mesh, PartitionSpec(*spec))",
      "    return NamedSharding(mesh, PartitionSpec())",
      ("tests/test_reliability.py::test_fsdp_equals_replicated_with_less_memory_per_device_and_"
       "checkpoints_cross_over",)),
    M("bf16-compute-ignored", "precision=bfloat16 computes convolutions in bf16",
      "jtl/models/small.py",
      "dtype=self.dtype, conv_general_dilated=self.fast_paths.conv_general_dilated,",
      "dtype=jnp.float32, conv_general_dilated=self.fast_paths.conv_general_dilated,",
      (T_PRECISION + "test_bfloat16_computes_in_bf16_and_keeps_f32_params_and_optimizer_state_close_"
       "to_f32",)),
    M("accumulation-loop-traces-the-model", "gradient accumulation traces the objective's loop-body "
      "copy (on CPU every convolution a matmul inside the scan)", "jtl/accumulate.py",
      "  body = objective.in_loop_body()", "  body = objective",
      ("tests/test_cpu_ops.py::test_gradient_accumulation_traces_the_loop_body_copy_and_evaluation_"
       "the_model",)),
    M("cpu-fast-paths-option-ignored", "model.cpu_fast_paths=False gives XLA's operations",
      "jtl/models/cpu_ops.py", "  return FastPaths(enabled=cpu_fast_paths)",
      "  return FastPaths(enabled=True)",
      ("tests/test_cpu_ops.py::test_the_model_option_chooses_the_path_per_model_and_one_model_never_"
       "moves_another",)),
    M("declared-weights-not-loaded", "a distillation teacher comes through the transfer-init seam",
      "jtl/train.py", "  declared = s.objective.loaded_weights()", "  declared = ()",
      ("tests/test_distill.py::test_the_teacher_arrives_through_the_transfer_init_seam",)),
    M("compile-cache-off", "the persistent compilation cache is written and read back",
      "jtl/compile_cache.py", '  if not path or path.lower() == "none":', "  if True:",
      (T_PRECISION + "test_compilation_cache_is_written_then_reused",)),
    M("skip-nonfinite-applies-update", "skip_nonfinite_updates refuses a non-finite update",
      "jtl/train.py",
      "      new_state = jax.lax.cond(finite, lambda new, old: new, lambda new, old: old, new_state, state)\n",
      "",
      ("tests/test_reliability.py::test_skip_nonfinite_updates_refuses_the_update_and_counts_it",)),
    M("fomaml-keeps-second-order", "first_order=True drops the second-order term (FOMAML)",
      "jtl/objectives/maml.py", "      grads = jax.lax.stop_gradient(grads)", "      pass",
      ("tests/test_maml.py::test_fomaml_drops_exactly_the_second_order_term_on_a_quadratic",)),
    M("protonet-distance", "ProtoNet logits are negative squared Euclidean distances",
      "jtl/objectives/protonet.py",
      "  return jnp.sum(jnp.square(queries[:, None, :] - centres[None, :, :]), axis=-1)",
      "  return jnp.sum(jnp.abs(queries[:, None, :] - centres[None, :, :]), axis=-1)",
      ("tests/test_protonet.py::test_loss_equals_a_hand_computation_on_constructed_embeddings",)),
    M("layer-decay-exponent", "layer-wise lr decay gives depth d the factor decay ** d",
      "jtl/layer_decay.py", "  return jax.tree.map(lambda i: float(decay) ** (top - i), ids)",
      "  return jax.tree.map(lambda i: float(decay) ** max(top - i - 1, 0), ids)",
      ("tests/test_finetune.py::test_layer_decay_resnet18",)),
    M("eval-collect-keeps-padding", "representation evaluators read real examples only",
      "jtl/evaluators/base.py", '    keep = np.asarray(out.pop("__mask__"))',
      '    keep = np.ones_like(np.asarray(out.pop("__mask__")))',
      ("tests/test_representation_evaluators.py::test_collect_returns_the_real_examples_of_a_split_"
       "in_order_without_padding",
       "tests/test_contrastive.py::test_knn_and_probe_from_the_checkpoint_equal_numpy_references")),
    M("nonfinite-exit-status", "a non-finite loss ends the run with exit status 3 (not 2)",
      "experiments/cli.py", "EXIT_BAD_INPUT, EXIT_RUN_FAILED = 2, 3", "EXIT_BAD_INPUT, EXIT_RUN_FAILED = 2, 2",
      ("tests/test_reliability.py::test_nonfinite_loss_from_the_cli_is_exit_status_3_and_one_error_"
       "line",)),
    M("flip-ignored", "data.flip mirrors half of the training images", "jtl/data/preprocess.py",
      "  flip = draws[:, -1] < 0.5\n", "  flip = draws[:, -1] < 0.0\n",
      ("tests/test_real_resolution.py::test_flip_mirrors_about_half_and_changes_nothing_else",)),
    M("inception-eval-plain-resize", "data.crop='inception' evaluates the centre crop",
      "jtl/data/pipeline.py", "center_crop=c.center_crop if inception else None)",
      "center_crop=None)",
      ("tests/test_real_resolution.py::test_eval_reads_the_centre_crop_and_bad_crop_settings_are_"
       "refused",)),
    M("resized-crop-draws-per-step", "random-resized crops are keyed by global position (exact resume)",
      "jtl/data/pipeline.py",
      "    draws = per_position(preprocess.crop_draws(seed), preprocess.OFFSET_BLOCK)\n",
      "    draws = per_position(preprocess.crop_draws(seed + start_step), preprocess.OFFSET_BLOCK)\n",
      ("tests/test_real_resolution.py::test_inception_crops_flip_and_resume_exactly",)),
    M("cpu-choice-last-writer", "processes sharing a choices file agree on the first choice written",
      "jtl/models/cpu_ops.py", "      if name in on_file:\n", "      if False:\n",
      ("tests/test_cpu_ops.py::test_a_choice_another_process_wrote_first_wins_over_this_ones_"
       "measurement",)),
    M("evaluate-config-mesh-ignored", "evaluate --config takes that config's mesh section",
      "jtl/evaluate.py", 'for section in ("eval", "evals", "mesh"):', 'for section in ("eval", "evals"):',
      ("tests/test_evaluate.py::test_evaluate_with_config_takes_its_eval_and_mesh_sections",)),
    M("tf-imports-keras", "entry points import TensorFlow without Keras (a third of its import time)",
      "jtl/startup_notices.py", '    sys.modules["keras"] = None', '    pass  # (keras imported)',
      ("tests/test_progress.py::test_entry_points_import_tensorflow_without_keras_and_keras_still_"
       "loads_on_demand",)),
    M("prepare-unlocked", "a second process waits for the first to prepare the same dataset",
      "jtl/data/source.py", "    fcntl.flock(lock, fcntl.LOCK_EX)  # released", "    pass  # (unlocked)",
      ("tests/test_data.py::test_a_second_process_waits_for_the_first_to_prepare_the_same_dataset",)),
    M("pipeline-autograph", "jtl's tf.data map functions skip AutoGraph (1 s of every start-up)",
      "jtl/data/source.py", "  return tf.autograph.experimental.do_not_convert(fn)", "  return fn",
      ("tests/test_data.py::test_pipelines_are_traced_without_autograph",)),
    M("hparams-imports-keras", "writing the HParams record does not load Keras (1.5 s per run)",
      "jtl/hparams.py", "from tensorboard.plugins.hparams import summary_v2 as hp",
      "from tensorboard.plugins.hparams import api as hp",
      ("tests/test_progress.py::test_entry_points_import_tensorflow_without_keras_and_keras_still_"
       "loads_on_demand",)),
    M("closed-loop-tracebacks-printed", "a storage error prints one error line and no traceback",
      "experiments/cli.py", "  sys.unraisablehook = hook\n", "  del hook\n",
      ("tests/test_cli.py::test_late_callbacks_into_a_closed_event_loop_are_not_printed",
       "tests/test_kill.py::test_a_file_size_limit_is_one_error_line_and_the_rerun_finishes")),
    M("per-class-ignored", "data.per_class makes every per_class consecutive examples one class",
      "jtl/data/pipeline.py", "  if c.per_class:\n    epoch_order, size = balanced",
      "  if False:\n    epoch_order, size = balanced",
      ("tests/test_data.py::test_class_balanced_batches_are_whole_groups_of_one_class",)),
    M("glyphs-head-counts-every-class", "a head over glyphs' background characters fits its train split",
      "jtl/data/source.py", "  if split is not None and hasattr(builder, 'split_label_bound'):",
      "  if False:",
      ("tests/test_glyphs.py::test_a_head_over_the_background_characters_fits_the_train_split",)),
    M("rest-is-the-shots", "eval_split='rest' holds the train examples K-shot did not pick",
      "jtl/data/source.py", "    keep = np.setdiff1d(keep, chosen) if rest else chosen",
      "    keep = chosen",
      ("tests/test_data.py::test_the_rest_split_is_every_train_example_k_shot_did_not_pick",)),
    M("transfer-init-loads-nothing", "init_from loads the source run's weights (a probe on the "
      "glyph-trained encoder beats pixels)", "jtl/checkpoint.py",
      "        leaves.append(np.asarray(src[path], dtype=leaf.dtype))  # a dont_load leaf stays as given",
      "        leaves.append(leaf)",
      ("tests/test_glyphs.py::test_a_probe_on_the_meta_trained_encoder_beats_raw_pixels_on_unseen_"
       "characters",)),
    M("adaptation-init-ignored", "dann_digits.py / coral_digits.py init=RUN start from RUN's backbone",
      "experiments/configs/dann_digits.py", "    init_from_source(c, init)\n", "    pass\n",
      ("tests/test_domain.py::test_init_starts_from_a_pretrained_backbone_with_a_fresh_head_and_"
       "domain_classifier",)),
    M("rotations-not-turned", "data.episodes.rotations adds each class turned as new classes",
      "jtl/data/episodes.py", "np.rot90(pool.images, r * quarter_turns, axes=(1, 2))",
      "np.rot90(pool.images, 0, axes=(1, 2))",
      ("tests/test_episodes.py::test_rotations_add_each_class_turned_as_new_classes",)),
    M("episodic-stale-features", "episodic evaluators reuse pool features of the same checkpoint only",
      "jtl/evaluators/episodic.py",
      "if kept is not None and kept[0] is params and kept[1] is model_state:", "if kept is not None:",
      ("tests/test_episodes.py::test_evaluators_of_one_pool_embed_it_once_per_checkpoint_and_never_"
       "reuse_stale_features",)),
    M("glyphs-info-renders", "a prepared glyphs copy is opened without rendering (5 s per process)",
      "jtl/data/glyphs.py", "num_classes=self._counts()[0]", "num_classes=len(characters())",
      ("tests/test_glyphs.py::test_a_prepared_copy_is_opened_without_rendering_and_counts_what_the_"
       "rules_give",)),
    M("prefetch-thread-outlives-run", "a run's prefetch thread stops and closes its data pipeline "
      "when the run ends", "jtl/sharding.py", "    stop.set()\n    thread.join(timeout=60)",
      "    pass",
      ("tests/test_train.py::test_a_finished_run_leaves_no_thread_or_pipeline_behind",
       "tests/test_train.py::test_prefetch_stops_when_its_consumer_closes")),
    M("host-runs-ahead-of-devices", "the loop waits for the step it dispatched two steps earlier (a "
      "stop signal waits for a few queued steps, not log_every)", "jtl/loop.py",
      "        jax.block_until_ready(in_flight.popleft())", "        pass",
      ("tests/test_train.py::test_the_host_runs_at_most_two_steps_ahead_of_the_devices",)),
    M("test-session-folder-left", "a test session removes its session folder (TFDS data, compile "
      "cache) at its end", "tests/conftest.py", "    shutil.rmtree(SESSION_DIR, ignore_errors=True)",
      "    pass", ("tests/test_session_dir.py::test_one_session_folder_for_all_workers_and_gone_at_the_"
                  "end",)),
    M("evaluate-config-eval-ignored", "evaluate --config takes that config's eval section",
      "jtl/evaluate.py", 'for section in ("eval", "evals", "mesh"):', 'for section in ("evals", "mesh"):',
      ("tests/test_evaluate.py::test_evaluate_with_config_takes_its_eval_and_mesh_sections",)),
    M("labels-not-hidden", "data.label_fraction keeps each class's fraction of training labels, the "
      "rest read -1", "jtl/data/pipeline.py",
      "    targets = labelled.hide(targets, c.label_fraction.to_dict(), c.shots_seed)", "    pass",
      ("tests/test_labelled.py::test_each_class_keeps_its_fraction_of_training_labels_and_the_rest_"
       "read_missing",)),
    M("missing-labels-averaged-in", "a multitask task averages its error over the rows whose label "
      "is kept", "jtl/objectives/multitask.py",
      "      out.append(jnp.sum(error * has) / jnp.maximum(jnp.sum(has), 1.0))",
      "      out.append(error.mean())",
      ("tests/test_labelled.py::test_a_task_with_missing_labels_averages_its_error_over_the_rows_"
       "that_have_one",)),
    M("baselines-see-hidden-labels", "pixel baselines of a scarce feature fit its labelled training "
      "rows only", "jtl/baselines.py", "    if f in c.label_fraction:", "    if False:",
      ("tests/test_labelled.py::test_pixel_baselines_of_a_scarce_feature_fit_the_labelled_training_"
       "rows_only",)),
    M("adapt-steps-ignored", "an episodic evaluator's adapt_steps reaches the objective",
      "jtl/evaluators/episodic.py", '        fn = functools.partial(fn, steps=o["adapt_steps"])',
      "        pass",
      ("tests/test_episodes.py::test_adapt_steps_reach_the_objective_and_apply_to_adapt_only",)),
    M("maml-eval-steps-ignored", "MAML's episode_accuracy(steps=n) adapts for n steps",
      "jtl/objectives/maml.py", "    steps = self.eval_inner_steps if steps is None else steps",
      "    steps = self.eval_inner_steps",
      ("tests/test_maml.py::test_steps_at_evaluation_are_eval_inner_steps_unless_given",)),
    M("holdout-script-trained-on", "maml_glyphs.py:holdout leaves its script out of meta-training",
      "experiments/configs/maml_glyphs.py",
      "    c.data.labels = [ch.label for ch in chars if ch.script != a.holdout]",
      "    c.data.labels = [ch.label for ch in chars]",
      ("tests/test_glyphs.py::test_a_held_out_background_script_is_the_validation_set_and_never_"
       "trained_on",)),
    M("nn-near-rows-not-settled", "1-NN settles near-equal candidate rows by the differences",
      "jtl/baselines.py", "    for r in np.flatnonzero(near.sum(-1) > 1):",
      "    for r in np.flatnonzero(near.sum(-1) > len(near)):",
      ("tests/test_baselines.py::test_nearest_neighbour_is_exact_where_the_matrix_product_rounds",)),
    M("nn-no-slack", "1-NN's candidates span the matrix product's rounding (exact ties: the first)",
      "jtl/baselines.py",
      "    near = d <= nearest + relative * np.abs(nearest) + absolute * (b_sq + t_sq.max())",
      "    near = d <= nearest",
      ("tests/test_baselines.py::test_nearest_neighbour_is_exact_where_the_matrix_product_rounds",)),
    M("maml-inner-loop-traces-the-model", "MAML's inner-loop scan traces the model's loop-body copy "
      "(on CPU every convolution a matmul: 8x faster adaptation)", "jtl/objectives/maml.py",
      "    loop_model = self.in_loop_body().model", "    loop_model = self.model",
      ("tests/test_maml.py::test_adaptation_traces_the_models_loop_body_copy",)),
    M("summary-names-baselines", "a summary line's accuracies leave out the pixel baselines",
      "jtl/progress.py",
      "    return words[-1] in _MAIN and not set(words) & set(_BASELINES)",
      "    return words[-1] in _MAIN",
      ("tests/test_console.py::test_the_summary_names_episodic_accuracies_not_their_baselines",)),
    M("glyph-table-steps-ignored", "the glyph episode sweep trains first-order MAML and ANIL for "
      "their README rows' 4,000 steps", "experiments/configs/episodes_glyphs.py",
      "  c.total_steps = STEPS.get(a.learner, c.total_steps)", "  pass",
      ("tests/test_sweep.py::test_the_glyph_episode_table_runs_each_learner_at_its_readme_rows_"
       "length",)),
)
