"""Pages rendered from saved results, without loading a model: leaderboards, the policy catalogue, the paper
replication and the kvpress anchors."""
