"""LoRA training building blocks; ``kandinsky5_train_network.py`` is the flat loop over them.

``config`` (TrainConfig), ``distributed`` (process group), ``objective`` (flow-matching loss), ``step`` (optimizer
step), ``run`` (run state, checkpoints, resume), ``state`` (state directories, RNG), ``optim`` (optimizers and
schedules), ``sampler`` (sampling during training), ``validation`` (validation loss), ``monitor`` (bar, epoch lines,
history, summary), ``tracker`` (TensorBoard / wandb), ``report`` (loss.png, contact sheets).
"""
