"""Pure helpers and on-disk formats shared by the stages, training, inference and evaluation: no Ray here."""
