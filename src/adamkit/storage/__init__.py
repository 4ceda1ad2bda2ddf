"""How values live in memory: floating formats, stochastic rounding, Kahan / master parameters
(``formats``) and 8-bit blockwise codes (``quant8``). Small pure encode/decode functions that every
algorithm is composed with; nothing here knows an update rule."""
