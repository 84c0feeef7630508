module loraft/ollamarender

go 1.19
