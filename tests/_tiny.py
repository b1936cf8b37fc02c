"""Command-line overrides that make pretrain.py tiny enough for CPU tests (test_resnet, 32 px, K 64;
the asymmetric loss of the papers, where the demo default is symmetric)."""

TINY = [
    "--backbone", "test_resnet", "--embed_dim", "16", "--queue_size", "64", "--batch_size", "16",
    "--image_size", "32", "--log_steps", "2", "--report_to", "none", "--num_shards", "4",
    "--shuffle_buffer", "64", "--knn_k", "20", "--symmetric", "false",
]
