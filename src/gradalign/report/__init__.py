"""The comparison report and the whole study: settings (``settings``), the training configs it
composes (``configs``), what it reads from MLflow (``runs``), the final runs it trains
(``finals``), statistics (``stats``), the figure (``plots``), report.md (``markdown``), the
report itself (``build``), the study that sweeps then reports (``study``) and the commands'
shared body (``cli``). It reads sweeps from MLflow and never imports gradalign.sweep."""
