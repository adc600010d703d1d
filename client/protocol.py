"""What the server and a site say to each other: record names and keys of every Flower message.

One place for the contract, so that ``client`` (which answers) and ``server`` (which asks; it imports this
module, never the other way round) cannot drift apart.

Every message's ``CONFIG`` (train, evaluate, query) carries ``RUN_KEY``: the run the site's state files
(``client.state``: its privacy ledger, its local parameters) belong to; a resumed run keeps it.
train (server -> site): ``ARRAYS`` the shared parameters; ``CONFIG`` with ``SERVER_ROUND``, ``LOCAL_EPOCHS``,
``LR``, ``PROXIMAL_MU`` (FedProx; 0 turns it off), ``PRIOR_WEIGHT`` (FED-PsyAU's r) and ``COOCCURRENCE``
(the global AU co-occurrence prior, 144 floats row-major, empty to keep the published one).
train (site -> server): ``ARRAYS`` (the shared parameters after local training) and ``METRICS`` holding
``NUM_EXAMPLES`` and every key of ``TRAIN_METRIC_KEYS``; the same keys from every site (Flower's strategies
refuse replies whose keys differ), so a site without sample-level DP sends ``DP_EPSILON`` inf and zeros. A site
whose privacy budget is spent replies with ``DP_EXHAUSTED`` 1 and no ``ARRAYS``: the server leaves it out of the
aggregate and goes on with the others.
evaluate (site -> server): ``METRICS`` with ``NUM_EXAMPLES`` and ``EVALUATE_METRIC_KEYS``; ``"confusion"`` is the
CxC confusion matrix of the site's test split (row = true class, column = predicted), flattened row-major as
ints, so the server can pool the sites' predictions (MEGC2019 composite UF1 / UAR) from the summed matrices.
query (site -> server): ``AU_COUNTS`` MetricRecord with ``SITE_INDEX`` (so the server maps node ids to sites
before round 1), ``COUNTS`` (144 ints, row-major 12x12 co-occurrence counts over the site's training samples
that carry AU codes) and ``SAMPLES``.
"""

from __future__ import annotations

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
AU_COUNTS = "au-counts"

SERVER_ROUND = "server-round"
LOCAL_EPOCHS = "local-epochs"
LR = "lr"
PROXIMAL_MU = "proximal-mu"  # the key Flower's FedProx strategy sends
PRIOR_WEIGHT = "prior-weight"
COOCCURRENCE = "cooccurrence"
RUN_KEY = "run-key"  # in every message's config: the run a site's state file (client.state) belongs to

NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
SITE_INDEX = "site-index"  # position of the site in the federation's site list: replies are sorted by it
COUNTS = "counts"
SAMPLES = "samples"

DP_EPSILON = "dp-epsilon"  # the site's epsilon spent so far in the run (inf without sample-level DP)
DP_DELTA = "dp-delta"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"  # DP-SGD steps so far in the run
DP_EXHAUSTED = "dp-exhausted"  # 1: the site's budget is spent, it did not train and sent no arrays
DP_METRIC_KEYS = (DP_EPSILON, DP_DELTA, DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS, DP_EXHAUSTED)

TRAIN_METRIC_KEYS = (
    SITE_INDEX,
    "loss",
    "loss-mer",
    "loss-flow",
    "loss-landmarks",
    "loss-au",
    "train-uf1",
    "train-seconds",
    "bytes-sent",
    *DP_METRIC_KEYS,
)
EVALUATE_METRIC_KEYS = (
    SITE_INDEX,
    "uf1",
    "uar",
    "accuracy",
    "class-recall",
    "confusion",
    "epe",
    "nme",
    "au-f1",
    "evaluate-seconds",
)
QUERY_METRIC_KEYS = (SITE_INDEX, COUNTS, SAMPLES)
"""Exactly the keys of the query reply's ``AU_COUNTS`` record."""
