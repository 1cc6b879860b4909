// The widget manager still calls MathJax 2's MathJax.Hub.Queue to typeset widget output; the site serves MathJax 3.
// Runs after the page's MathJax configuration and before MathJax (deferred) loads: it adds to that configuration
// an answer to the v2 call, which forwards to v3's typesetPromise once MathJax is ready.
window.MathJax = Object.assign(window.MathJax || {}, {
  Hub: {Queue: function () {}},
  startup: {ready: function () {
    MathJax.startup.defaultReady();
    MathJax.Hub = {Queue: function () { return MathJax.typesetPromise ? MathJax.typesetPromise() : undefined; }};
  }}
});
