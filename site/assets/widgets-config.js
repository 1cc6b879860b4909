// set before embed-amd.js loads: the widget manager's own chunks and fonts come from this site
window.require && require.config({paths: {"@jupyter-widgets/html-manager/dist": "_static/widgets"}});
