"""The comparison report and the whole study: settings declared once (``settings``; flags,
checks and --help derive from the declaration in ``keys``), the training configs it composes
(``configs``), what it reads from MLflow (``runs``), the final runs it trains (``finals``),
statistics and the one verdict (``stats``), the figure (``plots``), report.md (``markdown``)
and report.html (``html``), the report run's page in MLflow (``page``), the report itself
(``build``), the study that sweeps then reports (``study``, its sweeps' progress in
``sweep_progress``), the summaries of a study of several parts (``summary``; ``audit`` with
``claims``, ``suite``) and the commands' shared body (``cli``). It reads sweeps from MLflow and
never imports gradalign.sweep."""
