"""The spectral pipeline SpRAy runs (Lapuschkin et al. 2019), shared by ``spray`` (attribution maps) and
``spray_latent`` (a layer's pooled activations): samples -> kNN affinity graph -> spectral embedding
(eigenvectors of the symmetric normalised graph Laplacian) -> number of groups from the eigengap ->
k-means on the embedding -> group prototypes, a 2-D view, and a ranking of the groups.

The ranking (:func:`rank_groups`): score = mean silhouette of the group's members x (1 - the group's share
of the class). An artefact that a model learnt as a shortcut is carried by a minority of a class (the
poisoned fraction), and the explanations of those samples share the artefact -- so they are alike among
themselves (cohesion) and unlike the class's other strategies (separation). The silhouette measures both at
once, scale-free in [-1, 1]; the share factor puts a small group above the class's main body, which is often
just as tight. Why not eigenvalues or sizes alone: a split of the main body into two halves has a gap and a
size too, but its halves touch each other, so their silhouettes are low.

Measured on planted groups (tests/test_reveal_contract.py) the share factor finds the group from 1/6 to 1/2 of
the class (the half-class case: both groups get the same factor and the tighter one wins); a silhouette alone
misses the small ones, because a class's main body is as tight as the minority. Past one half the rule ranks
the clean minority first, so it assumes the artefact is in at most half of the class.

A sample's score is its group's score plus 1e-3 x its own silhouette: the samples are ordered by the group
ranking first (a person reads groups, and an AUROC of the scores then measures the ranking), and within a
group the typical members first. Scoring each sample by its own silhouette alone ranked the members of loose
groups above the top group's border members (detection AUROC 0.57 against 0.88 on the timestamp benchmark,
docs/guide/reveal.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from teachx.reveal.base import CandidateGroup, RevealResult, prototypes_of


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:  # pragma: no cover - exercised only without the extra
        from teachx.errors import ConfigError

        raise ConfigError("reveal needs scikit-learn; install it with `pip install teachx[reveal]`") from None


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (all-zero rows stay zero): distances then compare patterns, not scale."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def knn_affinity(x: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """Symmetric 0/1 k-nearest-neighbour graph (i ~ j when either is among the other's k nearest), as
    SpRAy's default: free of a kernel width to tune."""
    _sklearn()
    from sklearn.neighbors import NearestNeighbors

    k = int(min(n_neighbors, len(x) - 1))
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    graph = nn.kneighbors_graph(x, mode="connectivity").tocsr()
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph.maximum(graph.T).tocsr()


def spectral_embedding(affinity: sp.spmatrix, n_eig: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_eig`` smallest eigenvalues (ascending) of the symmetric normalised Laplacian
    L = I - D^-1/2 W D^-1/2 and their eigenvectors (N, n_eig). Dense for small graphs, ARPACK otherwise."""
    n = affinity.shape[0]
    n_eig = int(min(n_eig, n - 1))
    deg = np.asarray(affinity.sum(1)).ravel()
    d = sp.diags(1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)))
    m = (d @ affinity @ d).tocsr()  # eigenvalues mu of M are 1 - lambda of L
    if n <= 1500:
        mu, vec = np.linalg.eigh(m.toarray())
        mu, vec = mu[::-1][:n_eig], vec[:, ::-1][:, :n_eig]
    else:
        from scipy.sparse.linalg import eigsh

        v0 = np.sqrt(np.where(deg > 0, deg, 1.0))  # deterministic start: the leading eigenvector of a connected graph
        mu, vec = eigsh(m, k=n_eig, which="LA", v0=v0 / np.linalg.norm(v0), tol=1e-8)
        order = np.argsort(-mu)
        mu, vec = mu[order], vec[:, order]
    vec = vec * np.where(vec[np.abs(vec).argmax(0), np.arange(vec.shape[1])] < 0, -1.0, 1.0)  # fixed signs
    return np.clip(1.0 - mu, 0.0, 2.0), vec


def eigengap(eigenvalues: np.ndarray, max_groups: int) -> int:
    """The number of groups the spectrum suggests: k where lambda_k - lambda_(k-1) is largest (k >= 1, at most
    ``max_groups``); a graph of k well-separated groups has k eigenvalues near 0, then a jump."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[: max_groups + 1]
    if len(lam) < 2:
        return 1
    gaps = np.diff(lam)
    return int(np.argmax(gaps)) + 1


def cluster_embedding(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means on the first ``k`` eigenvectors, rows normalised (Ng, Jordan and Weiss 2001); labels 0..k-1
    renumbered by first appearance, so equal inputs give equal labels."""
    _sklearn()
    from sklearn.cluster import KMeans

    u = normalise_rows(vectors[:, :k])
    raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(u)
    _, first = np.unique(raw, return_index=True)
    remap = {int(raw[i]): new for new, i in enumerate(sorted(first))}
    return np.array([remap[int(v)] for v in raw], dtype=np.int64)


def rank_groups(
    features: np.ndarray, labels: np.ndarray, indices: np.ndarray, n_prototypes: int = 4
) -> tuple[tuple[CandidateGroup, ...], np.ndarray]:
    """The groups of ``labels`` ranked by mean silhouette x (1 - share) (the module's docs say why), and each
    sample's score: its group's score + 1e-3 x its own silhouette (ordered by the ranking first)."""
    _sklearn()
    from sklearn.metrics import silhouette_samples

    n = len(labels)
    ids = np.unique(labels)
    sil = silhouette_samples(features, labels) if 1 < len(ids) < n else np.zeros(n)
    group_score = np.zeros(n)
    groups = []
    for g in ids:
        rows = np.flatnonzero(labels == g)
        frac = len(rows) / n
        cohesion = float(sil[rows].mean())
        group_score[rows] = cohesion * (1.0 - frac)
        groups.append(
            CandidateGroup(
                group=int(g),
                members=tuple(int(i) for i in indices[rows]),
                prototypes=tuple(int(i) for i in indices[prototypes_of(features, rows, n_prototypes)]),
                score=cohesion * (1.0 - frac),
                parts={"silhouette": cohesion, "share": frac},
            )
        )
    groups.sort(key=lambda g: (-g.score, g.group))
    return tuple(groups), group_score + 1e-3 * sil


def spectral_reveal(
    name: str,
    features: np.ndarray,
    indices: np.ndarray,
    *,
    n_neighbors: int,
    max_groups: int,
    n_groups: int | None,
    embedding: str,
    seed: int,
    options: dict[str, Any],
) -> RevealResult:
    """The whole pipeline on preprocessed ``features`` (N, D) of one class."""
    n = len(features)
    affinity = knn_affinity(features, n_neighbors)
    n_eig = min(max(max_groups + 1, 3), n - 1)
    lam, vec = spectral_embedding(affinity, n_eig)
    suggested = eigengap(lam, max_groups)
    k = int(n_groups) if n_groups else max(2, suggested)  # at least 2: a minority group can still surface
    k = min(k, n - 1)
    labels = cluster_embedding(vec, k, seed)
    groups, scores = rank_groups(features, labels, indices)
    if embedding == "tsne":
        from sklearn.manifold import TSNE

        view = TSNE(2, init="pca", random_state=seed, perplexity=min(30.0, (n - 1) / 3)).fit_transform(features)
    else:  # the spectral coordinates after the trivial first eigenvector
        view = vec[:, 1:3] if vec.shape[1] >= 3 else np.column_stack([vec[:, -1], np.zeros(n)])
    return RevealResult(
        method=name,
        indices=np.asarray(indices),
        scores=scores.astype(np.float64),
        labels=labels,
        embedding=np.asarray(view, dtype=np.float64),
        groups=groups,
        eigenvalues=lam,
        n_groups_eigengap=suggested,
        options=options,
    )
