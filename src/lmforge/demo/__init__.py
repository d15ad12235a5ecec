"""Demo data, not library core: the invented world the default pipeline trains and evaluates on
(stage `world`). Library modules never import it; its phrases reach the scorers only through the
eval suite's configuration."""
