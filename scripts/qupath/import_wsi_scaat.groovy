/*
 * Import the wsi-scaat review exports of a slide into the image open in QuPath (0.4 to 0.7).
 *
 *   <NAME>.tiles.geojson    one locked tile per patch, measurements prob_<class>, saliency_mean, saliency_max
 *   <NAME>.regions.geojson  high-saliency outlines, class "saliency-high", measurements area_um2,
 *                           saliency_mean, saliency_max, prob_mean, n_patches
 *
 * Coordinates are level-0 pixels of the slide, so the objects land on the slide itself.
 * Use: open the slide, Automate > Script editor (0.4: Show script editor), File > Open this file, Run.
 *
 * Running it again replaces the tiles and regions of the earlier run (REPLACE) and nothing else:
 * objects made inside them (cells detected in a region, say) are kept, moved up to the region's
 * parent. Only calls that none of QuPath 0.4 to 0.7 deprecates are used.
 */
import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

// Folder holding the exports; null = the folder of the open image.
String EXPORT_DIR = null
// Export name (the slide id); null = the image's file name without its extension ("x.ome.tif" -> "x").
String NAME = null
// Remove the tiles and regions of an earlier run of this script before importing.
boolean REPLACE = true

def imageData = getCurrentImageData()
if (imageData == null) {
    println 'Open the slide first, then run this script.'
    return
}
def server = imageData.getServer()
def hierarchy = imageData.getHierarchy()
def imageFile = server.getURIs().collect { GeneralTools.toPath(it) }.find { it != null }?.toFile()
def folder = EXPORT_DIR != null ? new File(EXPORT_DIR) : imageFile?.getParentFile()
if (folder == null) {
    println 'Cannot tell the folder of this image: set EXPORT_DIR at the top of the script.'
    return
}
// getNameWithoutExtension(File) strips ".ome.tif" whole, as the tiler names slide ids
def name = NAME ?: GeneralTools.getNameWithoutExtension(imageFile ?: new File(server.getMetadata().getName()))

def files = [regions: new File(folder, "${name}.regions.geojson"), tiles: new File(folder, "${name}.tiles.geojson")]
def missing = files.values().findAll { !it.isFile() }
if (missing) {
    println "Not found: ${missing.join(', ')}"
    println 'Set EXPORT_DIR (folder) and NAME (slide id) at the top of the script.'
    return
}

if (REPLACE) {
    def old = hierarchy.getAllObjects(false).findAll {
        (it.isTile() && it.getName()?.startsWith('patch ')) || it.getPathClass()?.getName() == 'saliency-high'
    }
    if (old) {
        def oldSet = old as Set
        def kept = old.sum { o -> o.getChildObjects().count { !(it in oldSet) } }
        hierarchy.removeObjects(old, true)  // true: keep their children
        println "Removed ${old.size()} objects of an earlier import" + (kept ? "; kept ${kept} made inside them" : '')
    }
}

files.each { kind, file ->
    def objects = PathIO.readObjects(file)
    hierarchy.addObjects(objects)
    println "Imported ${objects.size()} ${kind == 'tiles' ? 'tiles (one per patch)' : 'high-saliency regions'} from ${file}"
}
println ''
println 'Colour the tiles: Measure > Show measurement maps, choose saliency_mean (or saliency_max, prob_<class>).'
println 'Region numbers: Measure > Show annotation measurements (area_um2, saliency_mean, prob_mean).'
