"""What a replica reports: previews from intermediate latents, prompt token counts, the
held work the autoscaler reads, and the record both paths keep (`replica_progress.py`:
steps run, batch sizes, a broken device)."""
