"""What training reads: the embedding cache's layout (`cache`), the pair source of one run
(`source`), its batches (`batches`) and the streamed pair view (`stream`)."""
