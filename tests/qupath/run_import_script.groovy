/*
 * Runs scripts/qupath/import_wsi_scaat.groovy as QuPath's script editor does, against
 * qupath-core's own PathObjectHierarchy and PathIO (the script's calls on the image data are
 * stubbed; everything it does to objects is QuPath's code).
 *
 *   groovy -cp <qupath-core jars> run_import_script.groovy SCRIPT IMAGE
 *
 * IMAGE is the path of the "open image" (only its name and folder are used). Steps:
 *   1. run the script on an empty image;
 *   2. add, as a user would, a cell inside the first saliency-high region (cell detection run with
 *      the region selected makes it the region's child) and an annotation of the user's own;
 *   3. run the script again (re-import).
 * After each run one line "STATE {json}" counts what is in the hierarchy; at the end "QP_CALLS [...]"
 * lists the QP methods the script called. Put slf4j-simple on the classpath to see QuPath's
 * warnings (deprecated calls of qupath-core log one).
 */
import qupath.lib.objects.PathObjects
import qupath.lib.objects.classes.PathClass
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.ROIs

def (scriptPath, imagePath) = args as List
def image = new File(imagePath)
def hierarchy = new PathObjectHierarchy()
def server = new Expando(getURIs: { -> [image.toURI()] }, getMetadata: { -> new Expando(getName: { -> image.name }) })
def imageData = new Expando(getServer: { -> server }, getHierarchy: { -> hierarchy })

def qpCalls = [] as Set  // methods of QuPath's QP the script called (the stubs below)
def run = {
    def binding = new Binding()
    binding.setVariable('getCurrentImageData', { -> qpCalls << 'getCurrentImageData'; imageData })
    // QP's object calls of 0.4/0.5 (as qupath.lib.scripting.QP does them), for scripts that use them
    binding.setVariable('getAllObjects', { boolean withRoot ->
        qpCalls << 'getAllObjects(boolean)'; hierarchy.getAllObjects(withRoot) })
    binding.setVariable('removeObjects', { objects, boolean keepChildren ->
        qpCalls << 'removeObjects(Collection, boolean)'; hierarchy.removeObjects(objects, keepChildren) })
    binding.setVariable('addObjects', { objects -> qpCalls << 'addObjects(Collection)'; hierarchy.addObjects(objects) })
    new GroovyShell(this.class.classLoader, binding).evaluate(new File(scriptPath))
}

def state = { step, extra = [:] ->
    def all = hierarchy.getAllObjects(false)
    def regions = all.findAll { it.getPathClass()?.getName() == 'saliency-high' }
    def counts = [
        step: step,
        objects: all.size(),
        tiles: all.count { it.isTile() && it.getName()?.startsWith('patch ') },
        regions: regions.size(),
    ] + extra.collectEntries { k, v -> [k, v()] }
    println 'STATE ' + groovy.json.JsonOutput.toJson(counts)
    return regions
}

run()
def regions = state('first import')
def region = regions[0]
def plane = ImagePlane.getDefaultPlane()
def c = region.getROI()
def cell = PathObjects.createCellObject(ROIs.createEllipseROI(c.getCentroidX() - 4, c.getCentroidY() - 4, 8, 8, plane),
        ROIs.createEllipseROI(c.getCentroidX() - 2, c.getCentroidY() - 2, 4, 4, plane), PathClass.fromString('Tumor'), null)
hierarchy.addObjectBelowParent(region, cell, true)
def mine = PathObjects.createAnnotationObject(ROIs.createRectangleROI(0, 0, 10, 10, plane), PathClass.fromString('Stroma'))
hierarchy.addObject(mine)
def user = [cell_present: { -> hierarchy.getAllObjects(false).contains(cell) },
            cell_parent: { -> cell.getParent() == null ? null : (cell.getParent().isRootObject() ? 'root' : cell.getParent().getPathClass()?.getName()) },
            annotation_present: { -> hierarchy.getAllObjects(false).contains(mine) }]
state('user objects added', user)
run()
state('re-import', user)
println 'QP_CALLS ' + groovy.json.JsonOutput.toJson(qpCalls.sort())
