"""A training curve that redraws itself in the notebook while a model trains: a Trainer callback
(gmlib.train's callback=), drawn by gmlib.train.plot_history."""
from gmlib.train import plot_history


class LossPlot:
    """The loss of a training run, redrawn every `every` steps and at the end; `fig` and `ax` stay
    for the final figure. Shown through a display handle only, so it does not pile up copies."""

    def __init__(self, title: str, every: int, figsize=(7, 4)):
        import matplotlib.pyplot as plt
        from IPython.display import display
        self.fig, self.ax = plt.subplots(figsize=figsize)
        plt.close(self.fig)
        self.handle = display(self.fig, display_id=True)
        self.title, self.every = title, every

    def __call__(self, t):
        if t.step % self.every == 0 or t.done:
            self.ax.clear()
            plot_history(t.history, self.ax)
            self.ax.set_title(f"{self.title}: step {t.step}")
            self.handle.update(self.fig)
